"""The report: a results dict (the contract between optimize/compare and the report)
in, report.md + self-contained report.html + plots out."""

import base64
import copy
import re

import networkx as nx
import pytest

from placer import report
from placer.report import comparison_rows, format_markdown_table, format_table, write_report

MiB = 2**20


def entry(method, measured, *, kind="baseline", feasible=True, reason=None, iqr=1.0, simulated=None):
    return {
        "method": method, "kind": kind, "feasible": feasible, "reason": reason,
        "simulated_ms": simulated if simulated is not None else measured,
        "measured_ms": measured, "iqr_ms": iqr if measured is not None else None,
        "peak_bytes": {"cpu:0": 30 * MiB, "cpu:1": 12 * MiB},
        "ratio_to_lower_bound": None if measured is None else measured / 50.0,
        "search_s": 0.5, "placement": [0, 1, 0, 1],
    }


@pytest.fixture
def results():
    """A realistic run: 2 virtual CPU devices, 6 baselines (one infeasible), RL best."""
    names = [f"group_{i}" for i in range(12)]
    edges = [[i, i + 1] for i in range(11)] + [[0, 5], [2, 7], [3, 9]]
    return {
        "workload": "zoo:nmt:small", "devices": ["cpu:0", "cpu:1"],
        "memory": {"cpu:0": None, "cpu:1": 64 * MiB}, "seed": 0, "budget_s": 120,
        "bounds": {"critical_path_ms": 40.0, "work_ms": 100.0, "lower_bound_ms": 50.0},
        "environment": {"host": "testhost", "cores": 2, "torch": "2.13.0", "python": "3.11.7",
                        "placer": "0.1.0", "date": "2026-11-27T05:00:00Z",
                        "command": "placer optimize zoo:nmt:small"},
        "methods": [
            entry("single", 100.0),
            entry("round_robin", None, feasible=False, reason="cpu:1 needs 80.0 MiB, has 64.0 MiB",
                  simulated=70.0),
            entry("metis", 90.0, iqr=4.0),
            entry("expert", 80.0, iqr=2.0),
            entry("etf", 85.0),
            entry("kernighan_lin", None, simulated=88.0),  # feasible, not measured
            entry("rl", 64.0, kind="rl", iqr=3.0, simulated=60.0),
        ],
        "best": "rl", "plan": "plan.json",
        "curve": [{"update": i, "samples": 16 * (i + 1), "elapsed_s": 2.0 * i,
                   "mean_ms": 90.0 - i, "best_sim_ms": 80.0 - 2 * i,
                   "best_measured_ms": None if i % 3 else 85.0 - 2 * i} for i in range(10)],
        "timeline": [
            {"device": "cpu:0", "kind": "fwd", "label": "group_0", "start_ms": 0.0, "end_ms": 10.0},
            {"device": "cpu:0", "kind": "xfer", "label": "0->1", "start_ms": 10.0, "end_ms": 11.0},
            {"device": "cpu:1", "kind": "fwd", "label": "group_1", "start_ms": 11.0, "end_ms": 25.0},
            {"device": "cpu:1", "kind": "bwd", "label": "group_1", "start_ms": 25.0, "end_ms": 45.0},
            {"device": "cpu:0", "kind": "bwd", "label": "group_0", "start_ms": 46.0, "end_ms": 60.0},
            {"device": "cpu:0", "kind": "opt", "label": "step", "start_ms": 60.0, "end_ms": 64.0},
        ],
        "groups": {"names": names, "edges": edges, "compute_ms": [1.0 + i for i in range(12)],
                   "placement": [i % 2 for i in range(12)]},
    }


def row(rows, method):
    return next(r for r in rows if r["method"] == method)


def test_speedups_are_ratios_of_measured_medians(results):
    rows = comparison_rows(results)
    # single 100 ms; best feasible measured heuristic is expert at 80 ms.
    assert row(rows, "rl")["speedup_vs_single"] == pytest.approx(100 / 64)  # 1.5625
    assert row(rows, "rl")["speedup_vs_best_heuristic"] == pytest.approx(80 / 64)  # 1.25
    assert row(rows, "expert")["speedup_vs_best_heuristic"] == pytest.approx(1.0)
    assert row(rows, "single")["speedup_vs_best_heuristic"] == pytest.approx(0.8)
    assert row(rows, "metis")["speedup_vs_single"] == pytest.approx(100 / 90)
    # Not measured, or infeasible: no speedup claimed.
    assert row(rows, "kernighan_lin")["speedup_vs_single"] is None
    assert row(rows, "round_robin")["speedup_vs_best_heuristic"] is None
    assert row(rows, "rl")["ratio_to_lower_bound"] == pytest.approx(64 / 50)


def test_infeasible_rows_do_not_count_as_best_heuristic(results):
    # An infeasible placement with a (bogus) fast measurement must not become the reference.
    results["methods"][1]["measured_ms"] = 10.0
    assert row(comparison_rows(results), "rl")["speedup_vs_best_heuristic"] == pytest.approx(80 / 64)


def test_rows_sorted_by_measured_time_with_infeasible_last(results):
    order = [r["method"] for r in comparison_rows(results)]
    assert order == ["rl", "expert", "etf", "metis", "single", "kernighan_lin", "round_robin"]
    text = format_table(results)
    lines = text.splitlines()
    assert lines[2].startswith("RL") and "1.56x" in lines[2] and "1.25x" in lines[2]
    assert lines[-1].startswith("round robin")
    assert "infeasible: cpu:1 needs 80.0 MiB, has 64.0 MiB" in lines[-1]
    assert "cpu:0 30.0 MiB, cpu:1 12.0 MiB" in lines[2]


def test_markdown_table_has_one_row_per_method(results):
    lines = format_markdown_table(results).splitlines()
    assert len(lines) == 2 + len(results["methods"])
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert lines[0].count("|") == lines[2].count("|")


def test_write_report_writes_every_file(results, tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    paths = write_report(results, tmp_path)
    assert set(paths) == {"markdown", "html", *report.PLOT_FILES}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(report.PLOT_FILES)
    # No staging leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plots", "report.html", "report.md"]
    for png in (tmp_path / "plots").iterdir():
        assert png.read_bytes().startswith(b"\x89PNG")


def test_markdown_links_existing_files(results, tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    md = write_report(results, tmp_path)["markdown"].read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert {"plan.json", *(f"plots/{p}" for p in report.PLOT_FILES)} == set(links)
    assert all((tmp_path / link).is_file() for link in links)
    assert "zoo:nmt:small" in md and "testhost" in md and "torch" in md
    assert "Chosen placement: RL, 64.00 ms" in md and "(expert, 80.00 ms): 1.25x" in md


def test_plan_not_linked_when_missing(results, tmp_path):
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "plan.json" not in md


def test_html_is_self_contained_and_embeds_every_png(results, tmp_path):
    paths = write_report(results, tmp_path)
    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(report.PLOT_FILES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {(tmp_path / "plots" / p).read_bytes() for p in report.PLOT_FILES}
    assert not re.search(r"<link|@import|url\(", page)
    assert "infeasible: cpu:1 needs 80.0 MiB" in page


def test_plots_skipped_cleanly_when_data_missing(results, tmp_path):
    for key in ("curve", "timeline", "groups"):
        del results[key]
    results["bounds"] = None
    results["environment"] = None
    paths = write_report(results, tmp_path)
    assert set(paths) == {"markdown", "html", "step_times.png"}
    md = paths["markdown"].read_text()
    assert "learning_curve" not in md and "timeline" not in md and "graph.png" not in md
    assert paths["html"].read_text().count("data:image/png") == 1


def test_minimal_results_still_give_a_report(tmp_path):
    paths = write_report({"workload": "model.py", "methods": [], "curve": None}, tmp_path)
    assert set(paths) == {"markdown", "html"}
    assert "No placement was measured." in paths["markdown"].read_text()
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


def test_rewrite_removes_plots_of_an_earlier_report(results, tmp_path):
    write_report(results, tmp_path)
    compare_results = copy.deepcopy(results)
    del compare_results["curve"]
    write_report(compare_results, tmp_path)
    assert not (tmp_path / "plots" / "learning_curve.png").exists()
    assert (tmp_path / "plots" / "timeline.png").exists()


def test_failure_leaves_no_partial_report(results, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_grouped_graph", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(results, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_report(results, tmp_path, monkeypatch):
    write_report(results, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_timeline", broken)
    changed = copy.deepcopy(results)
    changed["workload"] = "zoo:rnnlm:small"
    with pytest.raises(RuntimeError):
        write_report(changed, tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_layered_layout_puts_every_edge_left_to_right():
    graph = nx.gnp_random_graph(40, 0.1, seed=1, directed=True)
    dag = nx.DiGraph([(u, v) for u, v in graph.edges if u < v])
    pos = report.layered_layout(dag)
    assert all(pos[u][0] < pos[v][0] for u, v in dag.edges)
    # Nodes of one depth share an x and are spread in y.
    first = list(nx.topological_generations(dag))[0]
    assert len({round(pos[n][0], 9) for n in first}) == 1
    assert len({round(pos[n][1], 9) for n in first}) == len(first)


def test_grouped_graph_plot_handles_many_groups(tmp_path):
    n = 256
    dag = nx.gn_graph(n, seed=0).reverse()  # a random tree, edges away from the root
    groups = {"names": [f"g{i}" for i in range(n)], "edges": [list(e) for e in dag.edges],
              "compute_ms": [float(i % 7 + 1) for i in range(n)],
              "placement": [i % 3 for i in range(n)]}
    path = report.plot_grouped_graph(groups, ["cpu:0", "cpu:1", "cpu:2"], tmp_path / "g.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_run_notes_and_interruption_are_reported(results, tmp_path):
    results["notes"] = ["small size: image 75x75, batch 2"]
    results["interrupted"] = True
    md = write_report(results, tmp_path)["markdown"].read_text()
    notes = md.split("## Notes", 1)[1]
    assert notes.index("interrupted") < notes.index("image 75x75") < notes.index("interquartile")


def test_entries_with_missing_and_none_values(tmp_path):
    results = {"workload": "model.py", "bounds": {"lower_bound_ms": 20.0}, "methods": [
        {"method": "single", "measured_ms": 40.0},
        {"method": "rl", "measured_ms": 25.0, "feasible": None, "iqr_ms": None, "peak_bytes": None,
         "simulated_ms": None, "search_s": None, "ratio_to_lower_bound": None},
        {"method": "expert", "feasible": False, "reason": None},
    ]}
    rows = comparison_rows(results)
    assert [r["method"] for r in rows] == ["rl", "single", "expert"]
    assert rows[0]["kind"] == "rl" and rows[1]["kind"] == "baseline"
    assert rows[0]["speedup_vs_single"] == pytest.approx(1.6)
    assert rows[0]["speedup_vs_best_heuristic"] == pytest.approx(1.6)
    assert rows[0]["ratio_to_lower_bound"] == pytest.approx(1.25)  # computed when missing
    assert "infeasible: no reason given" in format_table(results)
    assert set(write_report(results, tmp_path)) == {"markdown", "html", "step_times.png"}


@pytest.mark.parametrize("n, text", [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (30 * MiB, "30.0 MiB"), (5 * 2**30, "5.0 GiB")])
def test_format_bytes(n, text):
    assert report.format_bytes(n) == text


def test_timeline_draws_event_kinds_it_does_not_know(results, tmp_path):
    timeline = results["timeline"] + [
        {"device": "cpu:0", "kind": "loss", "label": "loss", "start_ms": 45.0, "end_ms": 46.0},
        {"device": "cpu:2", "kind": None, "label": "?", "start_ms": 0.0, "end_ms": 1.0}]
    path = report.plot_timeline(timeline, results["devices"], tmp_path / "t.png")
    assert path.read_bytes().startswith(b"\x89PNG")
