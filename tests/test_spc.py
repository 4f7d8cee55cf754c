"""p-chart maths against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from defectscan.report.spc import p_chart


def test_centre_line_is_the_pooled_fraction_and_limits_vary_with_subgroup_size():
    # 2 + 3 + 25 failed of 100 + 100 + 300 judged: p̄ = 30 / 500 = 0.06
    chart = p_chart([("A", 100, 2), ("B", 100, 3), ("C", 300, 25)])
    assert chart.center == pytest.approx(0.06)
    a, b, c = chart.points
    # 3 * sqrt(0.06 * 0.94 / 100) = 0.071246...; lower limit clipped at 0
    assert a.ucl == pytest.approx(0.06 + 3 * math.sqrt(0.0564 / 100)) == pytest.approx(0.131247, abs=1e-6)
    assert a.lcl == 0.0 and b.ucl == a.ucl
    # the larger subgroup gets narrower limits: 3 * sqrt(0.0564 / 300) = 0.041134
    assert c.ucl == pytest.approx(0.101134, abs=1e-6) and c.lcl == pytest.approx(0.018866, abs=1e-6)
    assert (a.p, c.p) == (0.02, pytest.approx(25 / 300))
    assert chart.signals == ()


def test_points_beyond_their_own_limits_are_flagged_above_and_below():
    # p̄ = (40 + 0 + 20 + 20) / 400 = 0.2; sigma_n for n = 100 is 0.04: limits 0.08 .. 0.32
    chart = p_chart([("hi", 100, 40), ("lo", 100, 0), ("ok1", 100, 20), ("ok2", 100, 20)])
    assert chart.center == pytest.approx(0.2)
    assert [(p.label, p.signal) for p in chart.points] == [("hi", "above"), ("lo", "below"), ("ok1", None), ("ok2", None)]
    assert [p.label for p in chart.signals] == ["hi", "lo"]
    assert chart.points[0].ucl == pytest.approx(0.32) and chart.points[0].lcl == pytest.approx(0.08)


def test_sigma_width_is_a_parameter():
    two = p_chart([("a", 100, 40), ("b", 100, 0), ("c", 100, 20)], sigma=2.0)
    assert two.points[2].ucl == pytest.approx(0.2 + 2 * 0.04)


def test_no_failures_collapse_the_limits_without_flagging_anything():
    chart = p_chart([("a", 10, 0), ("b", 50, 0)])
    assert chart.center == 0.0
    assert all(p.lcl == p.ucl == 0.0 and p.signal is None for p in chart.points)


def test_subgroups_without_judged_images_get_no_point_and_an_empty_chart_is_empty():
    chart = p_chart([("errors only", 0, 0), ("a", 4, 1)])
    assert [p.label for p in chart.points] == ["a"]
    assert p_chart([]).points == () and p_chart([]).center == 0.0


def test_limits_never_leave_zero_to_one():
    chart = p_chart([("a", 2, 2), ("b", 2, 1), ("c", 2, 0)])
    assert all(0.0 <= p.lcl <= p.ucl <= 1.0 for p in chart.points)


@pytest.mark.parametrize("subgroup", [("a", 5, 6), ("a", -1, 0), ("a", 5, -1)])
def test_impossible_counts_are_refused(subgroup):
    with pytest.raises(ValueError, match="not a fraction"):
        p_chart([subgroup])
