"""The calibration cache: bounded file names, and unusable files treated as a miss."""

from __future__ import annotations

import json
import math

import pytest

from envs.calibrate import calibration_path, load_calibration, save_calibration
from envs.sim import Calibration
from graphs.devices import parse_cluster
from graphs.problem import PlacementProblem
from graphs.synthetic import random_grouped_graph

GOOD = Calibration({"cpu": 1.5}, {"cpu": (1e-4, 1e9)}, chunk_overhead_ms=0.2, loss_ms=0.1)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE", str(tmp_path))
    return tmp_path


def problem(devices: str = "cpu:0,cpu:1") -> PlacementProblem:
    return PlacementProblem(random_grouped_graph(6, seed=1), parse_cluster(devices))


@pytest.mark.parametrize("count", [2, 36, 400])
def test_the_file_name_stays_short_however_many_devices(count):
    many = problem(",".join(f"cpu:{i}" for i in range(count)))
    path = save_calibration(many, GOOD)  # 36+ virtual devices once failed: File name too long
    assert len(path.name.encode()) <= 140 and load_calibration(many) == GOOD
    fewer = problem(",".join(f"cpu:{i}" for i in range(count - 1)))
    assert calibration_path(fewer) != path  # the hashed tail still tells clusters apart


def good_json() -> dict:
    return GOOD.to_json()


def without(key):
    data = good_json()
    del data[key]
    return data


def replaced(path, value):
    data = good_json()
    *head, last = path
    target = data
    for key in head:
        target = target[key]
    target[last] = value
    return data


@pytest.mark.parametrize("content, why", [
    (None, "a directory"),
    ("{not json", "bad JSON"),
    (json.dumps([1, 2]), "not an object"),
    (json.dumps(without("links")), "a missing field"),
    (json.dumps(replaced(["compute_scale", "cpu"], "fast")), "a string"),
    (json.dumps(replaced(["compute_scale", "cpu"], math.nan)), "NaN"),
    (json.dumps(replaced(["chunk_overhead_ms"], -1.0)), "negative"),
    (json.dumps(replaced(["pipelined_slowdown"], "fast")), "a string slowdown"),
    (json.dumps(replaced(["links", "cpu", "bandwidth_Bps"], 0)), "zero bandwidth"),
    (json.dumps(replaced(["links", "cpu"], {"latency_s": 1e-4})), "a link without bandwidth"),
])
def test_an_unusable_calibration_file_is_a_miss_with_a_warning_naming_it(content, why):
    p = problem()
    path = calibration_path(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.warns(UserWarning) as caught:
        assert load_calibration(p) is None, why
    (warning,) = caught
    message = str(warning.message)
    assert str(path) in message and "\n" not in message
