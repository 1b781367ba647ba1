"""`placer` commands run as processes forked from a server that has already imported torch
and placer (multiprocessing's forkserver with those modules preloaded).

Each command still runs in a process of its own, with its own working directory,
environment, stdout, stderr and exit status, through placer.cli.main as the `placer`
script runs it; only the interpreter's start and the imports are shared. A fresh
`python -m placer.cli` spends 4-5 s importing torch and placer on a 2-core host, most of
a short command's time. What depends on the interpreter's own start (which modules a
command imports, PYTHON* variables, warnings raised while importing) needs a fresh
interpreter: tests.test_cli.placer(..., fresh_interpreter=True).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# What a command imports (placer's CLI imports them lazily, per command).
PRELOAD = ["torch", "placer.cli", "placer.optimize", "placer.report", "placer.compare", "placer.inspect_workload",
           "graphs.zoo", "tests.cli_runner"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _command(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The forked process: `placer ARGS` in `cwd` under `env`, stdout and stderr into files;
    its exit status is main()'s (multiprocessing exits with a SystemExit's code)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for path, fd in ((out, 1), (err, 2)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["placer", *args]
    from placer.cli import main

    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run(args: list[str], cwd: Path | None, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`placer ARGS` to its end, as subprocess.run(capture_output=True, text=True) returns it
    (a negative returncode: killed by that signal).

    Raises
    ------
    subprocess.TimeoutExpired
        It ran past `timeout` seconds (it is killed first).
    """
    with tempfile.TemporaryDirectory(prefix="placer-cli-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        process = _context.Process(target=_command, name="placer",
                                   args=(list(args), str(cwd or os.getcwd()), env, str(out), str(err)))
        process.start()
        try:
            process.join(timeout)
            if process.exitcode is None:
                raise subprocess.TimeoutExpired(["placer", *args], timeout)
        finally:  # also when pytest-timeout or Ctrl-C ends the test: no command outlives it
            if process.exitcode is None:
                process.kill()
                process.join()
        return subprocess.CompletedProcess(["placer", *args], process.exitcode, out.read_text(), err.read_text())
