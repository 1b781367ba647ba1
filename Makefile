# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use and install placer into it.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e '.[test]' "$(TORCH_SPEC)"
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/placer optimize

# First the `alone` tests, with the host to themselves: another process's load, or the minute after the
# suite's (profiled op costs 10% dearer than the steps measured just after: twice on 2026-12-02), would skew
# what they compare. Then two processes, each test file in one (its module fixtures built once).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m alone
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not alone"
