"""The report: a Results (the contract between optimize/compare and the report, also
read from its JSON) in, report.md + self-contained report.html + plots out."""

import base64
import copy
import json
import re

import networkx as nx
import pytest

from placer import report
from placer.report import comparison_rows, format_markdown_table, format_table, plots, write_report
from placer.results import Results

MiB = 2**20


def ratio(value, low, high, reference="unplaced"):
    verdict = "faster" if low > 1 else "slower" if high < 1 else "tie"
    return {"value": value, "ci": [low, high], "verdict": verdict, "reference": reference}


def entry(method, measured, *, kind="baseline", feasible=True, reason=None, iqr=1.0, simulated=None,
          vs_unplaced=None, vs_heuristic=None, session="baselines"):
    return {
        "method": method, "kind": kind, "feasible": feasible, "reason": reason,
        "simulated_ms": simulated if simulated is not None else measured,
        "measured_ms": measured, "iqr_ms": iqr if measured is not None else None,
        "ci_ms": None if measured is None else [measured - 1.0, measured + 1.5], "runs": 12 if measured else 0,
        "session": session if measured is not None else None,
        "peak_bytes": {"cpu:0": 30 * MiB, "cpu:1": 12 * MiB},
        "ratio_to_lower_bound": None if measured is None else measured / 50.0,
        "search_s": 0.5, "placement": [0, 1, 0, 1],
        "vs_unplaced": vs_unplaced, "vs_best_heuristic": vs_heuristic,
    }


@pytest.fixture
def results():
    """A realistic run: 2 virtual CPU devices, unplaced, 6 baselines (one infeasible), RL chosen."""
    names = [f"group_{i}" for i in range(12)]
    edges = [[i, i + 1] for i in range(11)] + [[0, 5], [2, 7], [3, 9]]
    return {
        "schema": "placer.results/v1", "command": "optimize", "run_id": "abc123", "status": "complete",
        "workload": "zoo:nmt:small", "devices": ["cpu:0", "cpu:1"],
        "memory": {"cpu:0": None, "cpu:1": 64 * MiB}, "seed": 0, "budget_s": 120,
        "protocol": {"target": 0.03, "min_runs": 5, "cap_s": 60.0},
        "bounds": {"critical_path_ms": 40.0, "work_ms": 100.0, "lower_bound_ms": 50.0},
        "environment": {"host": "testhost", "cores": 2, "torch": "2.13.0", "python": "3.11.7",
                        "placer": "0.1.0", "date": "2026-11-27T05:00:00Z",
                        "command": "placer optimize zoo:nmt:small"},
        "methods": [
            entry("unplaced", 96.0, kind="unplaced", session="confirm"),
            entry("single", 100.0, vs_unplaced=ratio(0.96, 0.9, 1.02), vs_heuristic=ratio(0.8, 0.7, 0.9, "expert")),
            entry("round_robin", None, feasible=False, reason="cpu:1 needs 80.0 MiB, has 64.0 MiB",
                  simulated=70.0),
            entry("metis", 90.0, iqr=4.0, vs_unplaced=ratio(1.07, 0.98, 1.1)),
            entry("expert", 80.0, iqr=2.0, vs_unplaced=ratio(1.2, 1.1, 1.3), session="confirm"),
            entry("etf", 85.0, vs_unplaced=ratio(1.13, 1.05, 1.2)),
            entry("kernighan_lin", None, simulated=88.0),  # feasible, not measured
            entry("rl", 64.0, kind="rl", iqr=3.0, simulated=60.0, session="confirm",
                  vs_unplaced=ratio(1.5, 1.4, 1.6), vs_heuristic=ratio(1.25, 1.18, 1.31, "expert")),
        ],
        "choice": {"method": "rl", "verdict": "faster", "session": "confirm", "shortlist": ["unplaced", "rl", "expert"],
                   "headline": "RL is measurably faster than the model run without placer: 1.50x (CI 1.40-1.60) "
                               "unplaced; 1.25x (CI 1.18-1.31) the best heuristic (expert).",
                   "vs_unplaced": ratio(1.5, 1.4, 1.6), "vs_best_heuristic": ratio(1.25, 1.18, 1.31, "expert")},
        "best": "rl", "plan": "plan.json",
        "curve": [{"update": i, "samples": 16 * (i + 1), "elapsed_s": 2.0 * i,
                   "mean_ms": 90.0 - i, "best_sim_ms": 80.0 - 2 * i, "calibration": i // 4,
                   "best_measured_ms": None if i < 3 else 85.0 - 2 * (i // 3),
                   "best_measured_ci_ms": None if i < 3 else [83.0 - 2 * (i // 3), 88.0 - 2 * (i // 3)]}
                  for i in range(10)],
        "best_measured": [{"method": "rl", "update": 3, "samples": 64, "elapsed_s": 6.0, "median_ms": 85.0,
                           "ci_ms": [83.0, 88.0]},
                          {"method": "rl", "update": 6, "samples": 112, "elapsed_s": 12.0, "median_ms": 83.0,
                           "ci_ms": [81.0, 86.0]}],
        "recalibrations": [{"update": 4, "samples": 80, "elapsed_s": 8.0, "measurements": 3},
                           {"update": 8, "samples": 144, "elapsed_s": 16.0, "measurements": 5}],
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
    return next(r for r in rows if r.method == method)


def test_table_shows_each_rows_stored_speedups_with_their_intervals(results):
    rows = comparison_rows(results)
    assert row(rows, "rl").vs_unplaced.value == pytest.approx(1.5)
    assert row(rows, "rl").vs_best_heuristic.value == pytest.approx(1.25)
    assert row(rows, "single").vs_unplaced.verdict == "tie"
    # Not measured, or infeasible: no speedup claimed.
    assert row(rows, "kernighan_lin").vs_unplaced is None
    assert row(rows, "round_robin").vs_best_heuristic is None
    assert row(rows, "rl").ratio_to_lower_bound == pytest.approx(64 / 50)
    results["methods"][1]["session"] = "confirm"  # beside unplaced's last: its ratio is shown (another's is not)
    text = format_table(results)
    rl_line = next(line for line in text.splitlines() if line.startswith("RL"))
    assert "1.50x [1.40, 1.60]" in rl_line and "1.25x [1.18, 1.31]" in rl_line and "63.00-65.50" in rl_line
    single_line = next(line for line in text.splitlines() if line.startswith("single device"))
    assert "0.96x tie [0.90, 1.02]" in single_line


def test_a_devices_column_appears_only_when_plans_ran_on_different_devices(results):
    from placer.report.table import table_cells

    for r in results["methods"]:
        r["devices"] = ["cpu"] if r["kind"] == "unplaced" else ["cpu:0", "cpu:1"]
    headers, _ = table_cells(results)
    assert "devices" not in headers  # optimize: one device set for every plan
    results["methods"][1]["devices"] = ["cpu"]  # compare: the single plan was made for `cpu`
    headers, cells = table_cells(results)
    column = headers.index("devices")
    by_method = {c[0].split(" (")[0]: c[column] for c in cells}
    assert by_method["single device"] == "cpu" and by_method["RL"] == "cpu:0,cpu:1"
    assert all(len(c) == len(headers) for c in cells)


def test_infeasible_rows_do_not_count_as_best_heuristic(results):
    # An infeasible placement with a (bogus) fast measurement must not become the reference.
    results["methods"][2]["measured_ms"] = 10.0
    assert Results.from_json(results).best_heuristic.method == "expert"


def test_rows_sorted_by_measured_time_with_infeasible_last(results):
    order = [r.method for r in comparison_rows(results)]
    assert order == ["rl", "expert", "etf", "metis", "unplaced", "single", "kernighan_lin", "round_robin"]
    text = format_table(results)
    lines = text.splitlines()
    assert lines[2].startswith("RL (chosen)")
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
    assert "zoo:nmt:small" in md and "testhost" in md and "torch" in md and "abc123" in md
    first = md.splitlines()[0]
    assert "RL is measurably faster than the model run without placer" in first and "1.25x (CI 1.18-1.31)" in first


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

    monkeypatch.setattr(plots, "plot_grouped_graph", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(results, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_report(results, tmp_path, monkeypatch):
    write_report(results, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_timeline", broken)
    changed = copy.deepcopy(results)
    changed["workload"] = "zoo:rnnlm:small"
    with pytest.raises(RuntimeError):
        write_report(changed, tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_layered_layout_puts_every_edge_left_to_right():
    graph = nx.gnp_random_graph(40, 0.1, seed=1, directed=True)
    dag = nx.DiGraph([(u, v) for u, v in graph.edges if u < v])
    before = copy.deepcopy(dict(dag.nodes(data=True)))
    pos = plots.layered_layout(dag)
    assert dict(dag.nodes(data=True)) == before  # the caller's graph is left unchanged
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
    path = plots.plot_grouped_graph(groups, ["cpu:0", "cpu:1", "cpu:2"], tmp_path / "g.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_run_notes_and_interruption_are_reported(results, tmp_path):
    results["notes"] = ["small size: image 75x75, batch 2"]
    results["status"] = "interrupted"
    md = write_report(results, tmp_path)["markdown"].read_text()
    notes = md.split("## Notes", 1)[1]
    assert notes.index("interrupted") < notes.index("image 75x75") < notes.index("interleaved")


def test_a_rows_note_is_reported_once_after_its_method(results, tmp_path):
    """optimize and compare copy every row's note into the run's notes for the terminal."""
    note = "the problem has 16 candidates, no more than the search may sample"
    results["methods"][-1]["notes"] = [note]
    results["notes"] = [note, "small size: image 75x75, batch 2"]
    notes = write_report(results, tmp_path)["markdown"].read_text().split("## Notes", 1)[1]
    assert notes.count(note) == 1 and f"RL: {note}" in notes
    assert "image 75x75" in notes


def test_a_ratio_judged_in_two_sessions_shows_both_in_the_table(results, tmp_path):
    crosscheck = ratio(1.02, 0.98, 1.06)
    results["methods"][-1]["vs_unplaced"] = {**ratio(1.1, 1.05, 1.15), "verdict": "tie", "earlier": [crosscheck]}
    assert "1.10x tie [1.05, 1.15], before 1.02x [0.98, 1.06]" in format_table(results)
    assert "1.10x tie [1.05, 1.15], before 1.02x [0.98, 1.06]" in \
        write_report(results, tmp_path)["markdown"].read_text()


def test_unversioned_results_with_missing_and_none_values(tmp_path):
    """results.json of earlier placer versions (no schema, no CIs) still renders."""
    results = {"workload": "model.py", "bounds": {"lower_bound_ms": 20.0}, "best": "rl", "methods": [
        {"method": "single", "measured_ms": 40.0},
        {"method": "rl", "measured_ms": 25.0, "feasible": None, "iqr_ms": None, "peak_bytes": None,
         "simulated_ms": None, "search_s": None, "ratio_to_lower_bound": None},
        {"method": "expert", "feasible": False, "reason": None},
    ]}
    rows = comparison_rows(results)
    assert [r.method for r in rows] == ["rl", "single", "expert"]
    assert rows[0].kind == "rl" and rows[1].kind == "baseline" and not rows[2].feasible
    assert rows[0].vs_unplaced is None and rows[0].vs_best_heuristic is None  # no CI: no speedup claimed
    assert "infeasible: no reason given" in format_table(results)
    paths = write_report(results, tmp_path)
    assert set(paths) == {"markdown", "html", "step_times.png"}
    assert paths["markdown"].read_text().splitlines()[0] == "**Chosen placement: RL, 25.00 ms per training step.**"


@pytest.mark.parametrize("n, text", [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (30 * MiB, "30.0 MiB"), (5 * 2**30, "5.0 GiB")])
def test_format_bytes(n, text):
    assert report.format_bytes(n) == text


def test_timeline_draws_event_kinds_it_does_not_know(results, tmp_path):
    timeline = results["timeline"] + [
        {"device": "cpu:0", "kind": "loss", "label": "loss", "start_ms": 45.0, "end_ms": 46.0},
        {"device": "cpu:2", "kind": None, "label": "?", "start_ms": 0.0, "end_ms": 1.0}]
    path = plots.plot_timeline(timeline, results["devices"], tmp_path / "t.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_each_devices_idle_share_is_the_step_its_compute_leaves_uncovered(tmp_path):
    """A pipeline's bubbles: overlapping events count once, transfers are not compute."""
    def event(device, kind, start, end, micro=0):
        return {"device": device, "kind": kind, "label": "g", "start_ms": start, "end_ms": end, "chunk": 0,
                "microbatch": micro}

    timeline = [event("cpu:0", "fwd", 0, 4), event("cpu:0", "bwd", 6, 10, 1), event("cpu:1", "fwd", 2, 6, 1),
                event("cpu:1", "fwd", 3, 5, 1), event("cpu:1", "xfer", 6, 8)]
    assert plots.idle_fractions(timeline, ["cpu:0", "cpu:1", "cpu:2"]) == pytest.approx(
        {"cpu:0": 0.2, "cpu:1": 0.6, "cpu:2": 1.0})
    path = plots.plot_timeline(timeline, ["cpu:0", "cpu:1"], tmp_path / "t.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def plan(method: str):
    from placer.plan import Plan
    return Plan(devices=["cpu:0", "cpu:1"], assignment={"x": "cpu:0"}, device_map={"": "cpu:0"}, fingerprint="f",
                method=method)


def test_publish_swaps_in_one_runs_files_together(results, tmp_path):
    first = Results.from_json(results)
    paths = report.publish(first, tmp_path, plan("rl"), warn=pytest.fail)
    assert {"plan", "results", "markdown", "html"} <= set(paths)
    assert json.loads((tmp_path / "results.json").read_text())["run_id"] == "abc123"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_ctrl_c_while_the_report_is_drawn_leaves_no_stale_report(results, tmp_path, monkeypatch):
    report.publish(Results.from_json(results), tmp_path, plan("expert"), warn=pytest.fail)  # an earlier run
    newer = Results.from_json({**results, "run_id": "new456"})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_timeline", interrupted)
    report.publish(newer, tmp_path, plan("rl"), warn=pytest.fail)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["run_id"] == "new456" and saved["status"] == "interrupted" and saved["interrupted_at"] == "report"
    assert json.loads((tmp_path / "plan.json").read_text())["method"] == "rl"
    # The earlier run's report is gone rather than left beside this run's results.
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.html").exists()
    assert not any((tmp_path / "plots").iterdir())


def test_a_report_that_cannot_be_written_is_a_warning_and_the_plan_is_written(results, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "save_figure", disk_full)
    warnings = []
    paths = report.publish(Results.from_json(results), tmp_path, plan("rl"), warn=warnings.append)
    assert set(paths) == {"plan", "results"} and (tmp_path / "plan.json").is_file()
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and str(tmp_path) in warnings[0]


def cells_by_method(results) -> dict[str, list[str]]:
    from placer.report.table import table_cells

    headers, cells = table_cells(results)
    return {c[0].split(" (")[0]: dict(zip(headers, c)) for c in cells}


def test_a_ratio_from_another_session_than_unplaceds_last_is_not_shown(results, tmp_path):
    # Was: such ratios in parentheses, "earlier session"; they compared with an unplaced median shown nowhere and
    # contradicted the ms column (trial 2, item 3), so they are left out (placer.choose.settle_ratios does the same
    # in results.json).
    results["methods"][5]["session"] = "final"  # etf: faster than unplaced as the final session measured it
    cells = cells_by_method(results)
    assert cells["ETF"]["vs unplaced"] == "-" and cells["ETF"]["vs best heuristic"] == "-"
    assert cells["ETF"]["measured ms"] != "-"  # its time stays
    assert cells["single device"]["vs unplaced"] == "-"
    assert cells["RL"]["vs unplaced"] == "1.50x [1.40, 1.60]"  # measured beside unplaced's confirm: the verdict
    assert cells["RL"]["vs best heuristic"] == "1.25x [1.18, 1.31]"
    notes = write_report(results, tmp_path)["markdown"].read_text().split("## Notes", 1)[1]
    assert "Speedups are shown only for rows measured in the confirm session, which measured unplaced last" in notes
    results["methods"][0]["session"] = "baselines"  # stopped in the search: unplaced from the baselines
    results["methods"][5]["session"] = "search"
    cells = cells_by_method(results)
    assert cells["ETF"]["vs unplaced"] == "-"
    assert cells["single device"]["vs unplaced"] == "0.96x tie [0.90, 1.02]"


def test_rows_of_one_plan_say_so(results):
    for i, r in enumerate(results["methods"]):
        r["placement"] = [i, 0, 0, 0]
    results["methods"][5]["placement"] = results["methods"][4]["placement"]  # etf places as expert does
    cells = cells_by_method(results)
    assert cells["ETF"]["status"] == "ok (same plan as expert)"
    assert cells["expert"]["status"] == "ok (same plan as ETF)"
    assert cells["RL"]["status"] == "ok" and cells["unplaced"]["status"] == "ok"
    results["methods"][5]["microbatches"] = 4  # pipelined: another plan
    assert cells_by_method(results)["ETF"]["status"] == "ok"


def test_ratios_over_an_unplaced_too_wide_to_measure_are_no_verdict(results, tmp_path):
    unplaced = results["methods"][0]
    unplaced.update(measured_ms=83.81, ci_ms=[44.44, 435.30], session="baselines")
    for r in results["methods"][1:]:
        if r["measured_ms"] is not None:
            r["session"] = "baselines"
    results["methods"][1]["vs_unplaced"] = {"value": 5.37, "ci": [2.68, 28.57], "verdict": "unmeasured",
                                            "reference": "unplaced"}
    cells = cells_by_method(results)
    assert cells["single device"]["vs unplaced"] == "(5.37x [2.68, 28.57]) no verdict"
    notes = write_report(results, tmp_path)["markdown"].read_text().split("## Notes", 1)[1]
    assert "Unplaced could not be measured in the baselines session (CI 44.44-435.30 ms around 83.81 ms" in notes
    assert "Ratios marked \"no verdict\"" in notes


def test_a_run_without_a_verdict_sets_an_earlier_plan_aside_and_says_so(results, tmp_path):
    # Trial 2 item 9: a run that ended "unmeasured" left the interrupted run's plan.json, which a loop would apply.
    report.publish(Results.from_json(results), tmp_path, plan("rl"), warn=pytest.fail)  # the earlier run's plan
    unmeasured = Results.from_json(results)
    unmeasured.choice.method, unmeasured.choice.verdict = None, "unmeasured"
    unmeasured.choice.headline = "No verdict: the host was busy; no plan is chosen and no plan.json is written."
    paths = report.publish(unmeasured, tmp_path, None, warn=pytest.fail)
    assert "plan" not in paths and not (tmp_path / "plan.json").exists()
    assert json.loads((tmp_path / report.UNCONFIRMED_PLAN).read_text())["method"] == "rl"  # no work lost
    assert f"renamed {report.UNCONFIRMED_PLAN}" in unmeasured.choice.headline
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["plan"] is None and f"renamed {report.UNCONFIRMED_PLAN}" in saved["choice"]["headline"]
    assert unmeasured.choice.headline in (tmp_path / "report.md").read_text()


def test_baselines_simulated_times_over_the_bound_are_labelled_simulated(results):
    from placer.report.table import table_cells

    assert "x lower bound" in table_cells(results)[0]
    results["command"] = "baseline"  # placer baseline --measure: measured rows over the bound, as the schema says
    headers, cells = table_cells(results)
    column = headers.index("x lower bound")
    assert all((c[column] == "-") == (c[headers.index("measured ms")] == "-") for c in cells)
    for row in results["methods"]:  # placer baseline: rows simulated, not measured
        row["measured_ms"], row["ratio_to_lower_bound"] = None, 1.5
    headers, cells = table_cells(results)
    assert "simulated x lower bound" in headers and "x lower bound" not in headers
    assert {c[headers.index("simulated x lower bound")] for c in cells} == {"1.50"}


def test_rows_measured_below_the_lower_bound_are_explained(results, tmp_path):
    # trial 6: "x lower bound 0.95" stood unexplained (a profile taken on a busy host)
    notes = write_report(results, tmp_path)["markdown"].read_text().split("## Notes", 1)[1]
    assert "below the lower bound" not in notes
    for r in results["methods"]:
        if r["method"] in ("rl", "expert"):
            r["ratio_to_lower_bound"] = 0.95
    notes = write_report(results, tmp_path)["markdown"].read_text().split("## Notes", 1)[1]
    assert "expert and others measured below the lower bound (x lower bound < 1)" in notes
    assert "profile-*.json" in notes


def test_a_win_on_virtual_cpu_devices_says_why_and_a_faster_row_not_chosen_says_why_not(results, tmp_path):
    # trial 9: a win over unplaced on cpu:0,cpu:1 came with no word of why, and an RL row faster
    # than the chosen plan with no word of why it lost
    def notes() -> str:
        return write_report(results, tmp_path)["markdown"].read_text().split("## Notes", 1)[1]

    results["methods"][0]["devices"] = ["cpu"]  # unplaced on the whole host
    assert "Why RL wins: unplaced runs every op on all the host's cores" in notes()
    assert "was chosen." not in notes()  # nothing measured faster than RL
    for method, ms in (("metis", 60.0), ("etf", 62.0)):
        next(r for r in results["methods"] if r["method"] == method).update(measured_ms=ms, ci_ms=[ms - 1, ms + 1.5])
    assert "METIS and others measured faster than RL, but not measurably so where both were measured" in notes()
    results["methods"][0]["devices"] = ["cuda:0"]  # unplaced on a GPU: the intra-op threads are not the story
    assert "Why RL wins" not in notes()
    results["methods"][0]["devices"] = ["cpu"]
    next(r for r in results["methods"] if r["method"] == "rl")["placement"] = [1, 1, 1, 1]  # one device: no side by side
    assert "Why RL wins" not in notes()
    results["choice"].update(method="unplaced", verdict="tie")
    assert "Why" not in notes() and "was chosen." not in notes()


def test_a_micro_batches_column_appears_when_a_row_is_pipelined(results):
    # trial 6: no table showed a plan's micro-batch count
    from placer.report.table import table_cells

    assert "micro-batches" not in table_cells(results)[0]
    rl = next(r for r in results["methods"] if r["method"] == "rl")
    rl["microbatches"], rl["schedule"] = 4, "gpipe"
    headers, cells = table_cells(results)
    column = headers.index("micro-batches")
    by_method = {c[0].split(" (")[0]: c[column] for c in cells}
    assert by_method["RL"] == "4 gpipe" and by_method["unplaced"] == "1"
    assert all(len(c) == len(headers) for c in cells)


def test_the_measurement_target_names_the_pause_before_each_step(results, tmp_path):
    results["protocol"] = {"target": 0.03, "min_runs": 5, "cap_s": 60.0, "pause_ms": 7.5}
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "CI half-width 3%, at least 5 steps, at most 60 s a session, a 7.5-ms pause before each step" in md


def test_the_vs_best_heuristic_column_appears_only_where_a_row_shows_a_ratio(results):
    # new-user trial s25: where unplaced wins, its last sessions measure no plan beside the heuristic, and the
    # column showed "-" on every row
    from placer.report.table import table_cells

    assert "vs best heuristic" in table_cells(results)[0]
    for row in results["methods"]:
        row["vs_best_heuristic"] = None
    headers, cells = table_cells(results)
    assert "vs best heuristic" not in headers and "vs unplaced" in headers
    assert all(len(c) == len(headers) for c in cells)
