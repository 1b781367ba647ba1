"""placer.runtime.stats: a Measurement and the statistics of step times (the confidence
interval of the median is checked in depth in tests/test_timing.py)."""

import pytest

from placer.runtime.stats import Measurement, median_ci, summarize


def test_ci_halfwidth_is_relative_to_the_median():
    m = summarize([9.0, 10.0, 10.0, 10.0, 11.0, 10.0, 10.0])
    low, high = m.ci_ms
    assert m.ci_halfwidth == pytest.approx((high - low) / 2 / 10.0)
    assert Measurement(feasible=False, reason="x").ci_halfwidth is None


def test_median_ci_needs_times():
    with pytest.raises(ValueError, match="no times"):
        median_ci([])


def test_an_infeasible_measurement_round_trips_with_its_reason():
    m = Measurement(feasible=False, reason="cpu:0 needs 9 bytes but has 1", peak_bytes={"cpu:0": 9})
    again = Measurement.from_json(m.to_json())
    assert not again.feasible and again.reason == m.reason and again.peak_bytes == {"cpu:0": 9}
