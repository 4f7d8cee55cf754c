"""RLE format and defect extraction, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from defectscan.errors import DataError
from defectscan.model import rle
from defectscan.model.verdict import VerdictRules, find_defects, judge, to_uint8

RULES = VerdictRules(threshold=0.5, min_defect_area=3, fail_score=0.9)


def test_rle_example_from_the_format_description():
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    assert rle.encode(mask) == "0 2 4 2"
    assert (rle.decode("0 2 4 2", (2, 3)) == mask).all()


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 3)])
def test_rle_round_trip_on_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        mask = rng.random(shape) > 0.5
        assert (rle.decode(rle.encode(mask), shape) == mask).all()
    assert rle.encode(np.ones(shape, bool)) == f"0 {shape[0] * shape[1]}"
    assert rle.encode(np.zeros(shape, bool)) == ""


@pytest.mark.parametrize("bad, reason", [("0 2 x", "integers"), ("0 2 4", "pairs"), ("5 3", "past the 2x3"), ("-1 2", "non-negative")])
def test_rle_decode_rejects_bad_text(bad, reason):
    with pytest.raises(DataError, match=reason):
        rle.decode(bad, (2, 3))


def test_to_uint8_rounds_and_clips():
    assert to_uint8(np.array([-0.1, 0.0, 0.5, 0.999, 1.0, 1.2])).tolist() == [0, 0, 128, 255, 255, 255]


def test_defects_by_hand():
    scores = np.zeros((2, 6, 8), np.uint8)
    # class 0: an L-shaped region of 4 pixels, scores 200, 200, 255, 128
    scores[0, 1, 1:3] = 200
    scores[0, 2, 2] = 255
    scores[0, 3, 2] = 128
    # class 0: a 2-pixel speck below min_defect_area (3): noise, not recorded
    scores[0, 5, 6:8] = 255
    # class 1: a diagonal of 3 pixels joined by 8-connectivity, one just below the threshold (127 < 127.5)
    scores[1, 0, 5] = scores[1, 1, 6] = scores[1, 2, 7] = 140
    scores[1, 3, 7] = 127
    defects = find_defects(scores, ["scratch", "spot"], RULES, origin=(100, 200))
    assert [(d.class_name, d.area) for d in defects] == [("scratch", 4), ("spot", 3)]
    scratch, spot = defects
    assert scratch.bbox == (101, 201, 104, 203)
    assert scratch.centroid == pytest.approx((100 + 7 / 4, 200 + 7 / 4))  # rows 1,1,2,3 and cols 1,2,2,2: both average 7/4
    assert scratch.max_score == pytest.approx(1.0)
    assert scratch.mean_score == pytest.approx((200 + 200 + 255 + 128) / 4 / 255)
    assert (rle.decode(scratch.rle, (3, 2)) == np.array([[1, 1], [0, 1], [0, 1]], bool)).all()
    assert spot.bbox == (100, 205, 103, 208)
    assert spot.eccentricity == pytest.approx(1.0)  # pixels on a line
    assert spot.orientation == pytest.approx(np.pi / 4)  # from the row axis to the major axis (scikit-image)


def test_verdict_rules():
    scores = np.zeros((1, 8, 8), np.uint8)
    scores[0, 2:4, 2:4] = 200  # 4 pixels scoring 0.78: recorded, below fail_score 0.9
    result = judge(7, scores, ["defect"], RULES)
    assert (result.position, result.verdict, result.defect_pixels) == (7, "pass", 4)
    assert result.max_score == pytest.approx(200 / 255)
    scores[0, 3, 3] = 240  # 0.94 >= 0.9: fail
    failed = judge(7, scores, ["defect"], RULES)
    assert failed.verdict == "fail" and len(failed.defects) == 1
    empty = judge(0, np.zeros((1, 4, 4), np.uint8), ["defect"], RULES)
    assert (empty.verdict, empty.defects, empty.max_score) == ("pass", [], 0.0)


def test_score_map_must_match_the_classes():
    with pytest.raises(ValueError, match=r"expected a \(2, H, W\) score map"):
        find_defects(np.zeros((1, 4, 4), np.uint8), ["a", "b"], RULES)


def test_per_class_rules_override_the_common_ones():
    scores = np.zeros((2, 8, 8), np.uint8)
    scores[0, 0:2, 0:2] = 200  # 4 pixels, score 0.78
    scores[1, 4:6, 4:6] = 200
    rules = VerdictRules(threshold=0.5, min_defect_area=3, fail_score=0.9, per_class={"spot": {"min_defect_area": 5, "fail_score": 0.7}})
    assert rules.for_class("scratch") == VerdictRules(0.5, 3, 0.9)
    assert rules.for_class("spot") == VerdictRules(0.5, 5, 0.7)
    assert [d.class_name for d in find_defects(scores, ["scratch", "spot"], rules)] == ["scratch"]
    # the scratch is recorded but scores below its class's fail score: a pass
    assert judge(0, scores, ["scratch", "spot"], rules).verdict == "pass"
    looser = VerdictRules(threshold=0.5, min_defect_area=3, fail_score=0.9, per_class={"scratch": {"fail_score": 0.7}})
    assert judge(0, scores, ["scratch", "spot"], looser).verdict == "fail"
    assert VerdictRules.from_dict(looser.as_dict()) == looser


@pytest.mark.parametrize("bad, message", [
    ({"threshold": 1.0}, "threshold 1.0 must be between 0 and 1"),
    ({"fail_score": 1.5}, "fail_score 1.5 must be within 0..1"),
    ({"min_defect_area": 0}, "min_defect_area 0 must be at least 1"),
    ({"per_class": {"spot": {"area": 3}}}, "verdict rule for class spot: unknown field"),
])
def test_a_bad_rule_is_refused_by_name(bad, message):
    fields = {"threshold": 0.5, "min_defect_area": 3, "fail_score": 0.5, **bad}
    with pytest.raises(ValueError, match=message):
        VerdictRules(**fields)


def test_a_rule_value_set_for_the_run_holds_for_every_class_over_recorded_per_class_values():
    """The README: settings or a job spec override the recorded values; a recorded per-class fail_score won over them."""
    from defectscan.config import load_settings
    from defectscan.db.schema import Model
    from defectscan.pipeline.run import verdict_rules

    point = {"threshold": 0.5, "min_defect_area": 4, "fail_score": 0.5,
             "per_class": {"scratch": {"fail_score": 0.9, "min_defect_area": 9}, "stain": {"fail_score": 0.8}}}
    row = Model(name="m", version="1", threshold=0.5, operating_point=point)
    assert verdict_rules(row, load_settings(environ={}).inspection).for_class("scratch") == VerdictRules(0.5, 9, 0.9)
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__FAIL_SCORE": "0.3"}).inspection
    rules = verdict_rules(row, settings)
    assert rules.for_class("scratch") == VerdictRules(0.5, 9, 0.3)
    assert rules.for_class("stain") == VerdictRules(0.5, 4, 0.3)
    assert rules.per_class == {"scratch": {"min_defect_area": 9}}


def test_the_verdict_score_ranks_images_as_their_verdicts_under_per_class_fail_scores():
    """A good image's 0.80 scratch (fail_score 0.9) outranked a defective image's 0.40 dent (fail_score 0.3): AUC 0.0 for perfect verdicts."""
    from defectscan.model.operating_point import RuleScores

    rules = VerdictRules(threshold=0.2, min_defect_area=1, fail_score=0.5, per_class={"scratch": {"fail_score": 0.9}, "dent": {"fail_score": 0.3}})
    figures = RuleScores(rules, ["scratch", "dent"])
    good, bad = np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8)
    good[0, 2:6, 2:6] = 204  # scratch at 0.80: passes
    bad[1, 2:6, 2:6] = 102  # dent at 0.40: fails
    truth = np.zeros((2, 16, 16), bool)
    figures.update(good, truth)
    truth[1, 2:6, 2:6] = True
    figures.update(bad, truth)
    result = figures.result()
    assert (result["tp"], result["tn"], result["image_auroc"]) == (1, 1, 1.0)


def test_a_rule_is_described_with_its_per_class_values():
    """`models register`, `train` and `evaluate` printed only the common fields: a multi-class model's real rule was hidden."""
    from defectscan.model.registry import describe_operating_point

    rules = VerdictRules(0.5, 16, 0.6, per_class={"scratch": {"fail_score": 0.95, "min_defect_area": 4}})
    assert rules.describe() == "threshold 0.5, min_defect_area 16, fail_score 0.6; scratch: min_defect_area 4, fail_score 0.95"
    assert describe_operating_point(rules.as_dict()).startswith(rules.describe() + " (")
