"""The verdict rule's figures and the choice of an operating point on held-out images."""

from __future__ import annotations

import numpy as np
import pytest

from defectscan.data.dataset import LabelledImages, split_validation
from defectscan.errors import DataError
from defectscan.model.evaluate import evaluate_model
from defectscan.model.export import load_model
from defectscan.model.operating_point import RuleGrid, RuleScores, check_target
from defectscan.model.verdict import VerdictRules, judge

from pipeline_helpers import save_threshold_model

SIZE = 64


def _maps(seed: int, n: int = 12):
    """Score maps with blobs of graded scores; odd images carry a labelled defect."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scores = np.zeros((1, SIZE, SIZE), np.uint8)
        truth = np.zeros((1, SIZE, SIZE), bool)
        for _ in range(3):
            y, x, side = *rng.integers(0, SIZE - 10, 2), int(rng.integers(1, 8))
            scores[0, y : y + side, x : x + side] = rng.integers(20, 256)
        if i % 2:
            y, x = rng.integers(0, SIZE - 12, 2)
            truth[0, y : y + 10, x : x + 10] = True
            scores[0, y : y + 10, x : x + 10] = np.maximum(scores[0, y : y + 10, x : x + 10], rng.integers(100, 256))
        out.append((scores, truth))
    return out


def test_each_cell_of_the_grid_is_the_verdict_rule_itself():
    maps = _maps(0)
    grid = RuleGrid(thresholds=(0.2, 0.5), areas=(1, 16, 40))
    for scores, truth in maps:
        grid.update(scores, truth)
    for t in grid.thresholds:
        for a in grid.areas:
            rules = VerdictRules(threshold=t, min_defect_area=a, fail_score=t)
            one = RuleScores(rules, ["defect"])
            for scores, truth in maps:
                one.update(scores, truth)
                assert judge(0, scores, ["defect"], rules).verdict == ("fail" if one.failed[-1] else "pass")
            assert grid.score[(t, a)] == pytest.approx(one.score)
            assert grid.dice[(t, a)] == pytest.approx(one.dice)


def _graded_images(n: int = 40) -> LabelledImages:
    """Images for the threshold model (probability rises with brightness above ~225).

    Good images carry bright nuisance marks of graded brightness, defective ones a labelled mark of
    graded brightness: no rule separates them all, so the target rate has something to trade.
    """
    rng = np.random.default_rng(3)
    images, labels = [], []
    for i in range(n):
        image = np.clip(rng.normal(120, 15, (SIZE, SIZE)), 0, 200).astype(np.uint8)
        label = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(4, SIZE - 16, 2)
        brightness = int(rng.integers(226, 255))
        image[y : y + 8, x : x + 8] = brightness
        if i % 2:
            label[y : y + 8, x : x + 8] = 1
        images.append(image)
        labels.append(label)
    return LabelledImages(
        name="graded",
        keys=[f"Class1/Train/{i:04d}.PNG" for i in range(n)],
        classes=["defect"],
        shape=(SIZE, SIZE),
        loader=lambda i: (images[i], labels[i]),
        defective=[bool(i % 2) for i in range(n)],
    )


def test_a_higher_target_false_call_rate_trades_false_calls_for_escapes(tmp_path):
    model = load_model(save_threshold_model(tmp_path / "threshold.keras"))
    images = _graded_images()
    strict = evaluate_model(model, images, choose_for=0.02)
    loose = evaluate_model(model, images, choose_for=0.4)
    s, l = strict["operating_point"], loose["operating_point"]
    assert s["figures"]["false_call_rate"] <= 0.02 < l["figures"]["false_call_rate"] <= 0.4
    assert l["figures"]["escape_rate"] < s["figures"]["escape_rate"]
    assert {k: s[k] for k in ("threshold", "min_defect_area", "fail_score")} != {k: l[k] for k in ("threshold", "min_defect_area", "fail_score")}
    # The verdict table scores the chosen rule through the same function inspect uses.
    assert strict["verdict_rule"]["rule"]["fail_score"] == s["fail_score"]
    assert strict["verdict_rule"]["false_call_rate"] == s["figures"]["false_call_rate"]
    # 20 defect-free images cannot show a rate of 2 %: the point says so; 40 % they can
    assert s["caution"].startswith("only 20 defect-free images: one false call would be 0.050, above the target 0.02; at least 50")
    assert "caution" not in l


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5])
def test_a_target_outside_zero_one_is_refused(rate):
    with pytest.raises(DataError, match=rf"target false-call rate {rate} must be strictly between 0 and 1"):
        check_target(rate)


@pytest.mark.parametrize("keep, kind", [(1, "defect-free"), (0, "defective")])
def test_choosing_needs_good_and_defective_images(keep, kind):
    grid = RuleGrid(thresholds=(0.5,), areas=(1,))
    for scores, truth in _maps(1):
        if truth.any() == bool(keep):
            grid.update(scores, truth)
    with pytest.raises(DataError, match=f"hold no {kind} image"):
        grid.choose(0.01)


def test_validation_split_is_stratified_reproducible_and_disjoint():
    keys, defective = [], []
    for c in (1, 2):
        for i in range(10):
            keys.append(f"Class{c}/Train/{i:04d}.PNG")
            defective.append(i < (4 if c == 1 else 2))
    images = LabelledImages("set", keys, ["defect"], (8, 8), lambda i: (None, None), defective)
    train, validation = split_validation(images, 0.25, seed=0)
    again = split_validation(images, 0.25, seed=0)[1]
    other = split_validation(images, 0.25, seed=1)[1]
    assert validation.keys == again.keys and validation.keys != other.keys
    assert not set(train.keys) & set(validation.keys) and len(train) + len(validation) == 20
    for c, bad in ((1, 4), (2, 2)):
        held = [d for k, d in zip(validation.keys, validation.defective, strict=True) if k.startswith(f"Class{c}/")]
        # every stratum gives at least one image, in its own proportion
        assert sum(held) == max(1, round(0.25 * bad)) and len(held) - sum(held) == max(1, round(0.25 * (10 - bad)))
    with pytest.raises(DataError, match="validation fraction 1.0 must be strictly between 0 and 1"):
        split_validation(images, 1.0, seed=0)


def test_evaluate_scores_exactly_what_inspect_records(factory, cluster, tmp_path):
    """The verdict-rule TPR/TNR of `evaluate` equal the verdicts `inspect` records on the same images."""
    from sqlalchemy import select

    from defectscan.config import load_settings
    from defectscan.db.schema import Image, Inspection
    from defectscan.model.registry import register_model
    from defectscan.pipeline.run import inspect_image_sets

    from pipeline_helpers import register, write_stack

    images = _graded_images(24)
    model_path = save_threshold_model(tmp_path / "threshold.keras")
    point = {"threshold": 0.3, "min_defect_area": 20, "fail_score": 0.7}
    with factory() as session:
        model = register_model(session, model_path, name="graded", version="1", operating_point=point)
    stack = np.stack([images.load(i)[0] for i in range(len(images))])
    image_set = register(factory, write_stack(tmp_path / "graded.zarr", stack))
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8"}).inspection
    summary = inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2)
    assert summary.status == "succeeded"
    with factory() as session:
        verdicts = session.execute(select(Inspection.verdict).join(Image).order_by(Image.position)).scalars().all()
    failed = np.array([v == "fail" for v in verdicts])
    defective = np.array(images.defective)
    evaluated = evaluate_model(load_model(model_path), images, rules=VerdictRules.from_dict(point))["verdict_rule"]
    assert (evaluated["tp"], evaluated["fp"], evaluated["fn"], evaluated["tn"]) == (
        int((failed & defective).sum()), int((failed & ~defective).sum()), int((~failed & defective).sum()), int((~failed & ~defective).sum()))
    # the rule had something to decide: both verdicts occur among each kind of image
    assert 0 < evaluated["tp"] < defective.sum() and 0 < evaluated["tn"] < (~defective).sum()


def _write_graded_dagm(root, images: LabelledImages):
    from PIL import Image as PILImage

    split = root / "Class1" / "Train"
    (split / "Label").mkdir(parents=True)
    lines = []
    for i in range(len(images)):
        image, label = images.load(i)
        PILImage.fromarray(image).save(split / f"{i + 1:04d}.PNG")
        if label.any():
            PILImage.fromarray((label * 255).astype(np.uint8)).save(split / "Label" / f"{i + 1:04d}_label.PNG")
            lines.append(f"{i + 1}\t1\t{i + 1:04d}.PNG\t0\t{i + 1:04d}_label.PNG")
        else:
            lines.append(f"{i + 1}\t0\t{i + 1:04d}.PNG\t0\t0")
    (split / "Label" / "Labels.txt").write_text("1\n" + "\n".join(lines) + "\n")
    return root


def test_evaluate_chooses_an_operating_point_into_the_sidecar_and_register_records_it(cli, tmp_path, migrated_url):
    import json

    data = _write_graded_dagm(tmp_path / "graded", _graded_images())
    model_path = save_threshold_model(tmp_path / "threshold.keras")
    result = cli("evaluate", str(model_path), "--data", str(data), "--split", "Train", "--choose-operating-point", "--target-false-call-rate", "0.1")
    assert result.exit_code == 0, result.output
    assert "chosen on these images for a false-call rate of at most 0.1" in result.output
    sidecar = json.loads((tmp_path / "threshold.json").read_text())
    point = sidecar["operating_point"]
    assert point["figures"]["false_call_rate"] <= 0.1 and sidecar["threshold"] == point["threshold"]
    # the next evaluation of the file scores the recorded rule
    again = cli("evaluate", str(model_path), "--data", str(data), "--split", "Train")
    assert f"threshold {point['threshold']:g}, min_defect_area {point['min_defect_area']}, fail_score {point['fail_score']:g}" in again.output
    registered = cli("--database-url", migrated_url, "models", "register", str(model_path), "--name", "graded", "--version", "1")
    assert registered.exit_code == 0, registered.output
    assert "chosen on 40 held-out images (20 defective) for a false-call rate <= 0.1" in registered.output
    shown = cli("--database-url", migrated_url, "models", "show", "graded:1")
    assert json.loads(shown.stdout)["operating_point"] == point
    # a registered version is evaluated under the rule inspect would judge with: the settings' over the recorded one
    overridden = cli("--database-url", migrated_url, "evaluate", "graded:1", "--data", str(data), "--split", "Train",
                     env={"DEFECTSCAN_INSPECTION__MIN_DEFECT_AREA": "777"})
    assert overridden.exit_code == 0, overridden.output
    assert f"threshold {point['threshold']:g}, min_defect_area 777, fail_score {point['fail_score']:g}" in overridden.output


@pytest.mark.parametrize("rate", ["0", "1.5"])
def test_evaluate_refuses_a_target_outside_zero_one_in_one_line(cli, tmp_path, rate):
    model_path = save_threshold_model(tmp_path / "threshold.keras")
    result = cli("evaluate", str(model_path), "--data", str(tmp_path), "--choose-operating-point", "--target-false-call-rate", rate)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: target false-call rate {float(rate)} must be strictly between 0 and 1 (e.g. 0.01 for 1 %)"


def test_evaluate_refuses_a_target_without_choose_operating_point(cli, tmp_path):
    model_path = save_threshold_model(tmp_path / "threshold.keras")
    result = cli("evaluate", str(model_path), "--data", str(tmp_path), "--target-false-call-rate", "0.05")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --target-false-call-rate is the target of --choose-operating-point; give both, or neither"
    result = cli("evaluate", str(model_path), "--data", str(tmp_path), "--target-false-call-rate", "7")
    assert result.output.strip() == "Error: target false-call rate 7.0 must be strictly between 0 and 1 (e.g. 0.01 for 1 %)"


def test_when_no_rule_meets_the_target_the_images_are_still_scored_and_the_cli_says_why(cli, tmp_path):
    images = _graded_images(8)
    bright = []
    for i in range(len(images)):
        image, label = images.load(i)
        image = image.copy()
        image[40:62, 40:62] = 255  # on every image, good ones too: a defect no rule of the grid can drop
        bright.append((image, label))
    loud = LabelledImages("loud", images.keys, images.classes, images.shape, lambda i: bright[i], images.defective)
    model_path = save_threshold_model(tmp_path / "threshold.keras")
    metrics = evaluate_model(load_model(model_path), loud, choose_for=0.01)
    assert metrics["operating_point"] is None
    assert metrics["no_operating_point"] == "no rule of the grid keeps the false-call rate on the evaluation images within 0.01"
    assert metrics["verdict_rule"]["images"] == 8 and metrics["verdict_rule"]["false_call_rate"] == 1.0
    data = _write_graded_dagm(tmp_path / "loud", loud)
    result = cli("evaluate", str(model_path), "--data", str(data), "--split", "Train", "--choose-operating-point")
    assert result.exit_code == 1 and result.output.strip().startswith("Error: no rule of the grid keeps the false-call rate on the ")
    assert not (tmp_path / "threshold.json").exists()


def test_a_fail_score_on_the_edge_of_the_gap_still_fails_the_images_it_was_chosen_to_fail():
    """With defective images at 128/255 and good ones at 127/255, the recorded fail_score was 128/255 rounded
    up to six decimals (0.501961): every defective image passed under the rule chosen to fail them."""
    grid = RuleGrid(thresholds=(0.5,), areas=(1,))
    rules = []
    for i in range(40):
        scores = np.zeros((1, SIZE, SIZE), np.uint8)
        truth = np.zeros((1, SIZE, SIZE), bool)
        scores[0, 10:20, 10:20] = 128 if i % 4 == 0 else 127
        truth[0, 10:20, 10:20] = i % 4 == 0
        grid.update(scores, truth)
        rules.append((scores, truth))
    point = grid.choose(0.01)
    assert point["figures"]["escape_rate"] == 0.0 and point["figures"]["false_call_rate"] == 0.0
    chosen = VerdictRules.from_dict(point)
    verdicts = [judge(0, scores, ["defect"], chosen).verdict for scores, _ in rules]
    assert verdicts == ["fail" if i % 4 == 0 else "pass" for i in range(40)]


def test_a_missed_defect_scores_dice_0_whatever_the_number_of_classes():
    """Averaged over every class, the empty second channel scored 1: a defect missed entirely gave Dice 0.5."""
    scores = RuleScores(VerdictRules(0.5, 1, 0.5), ["scratch", "dent"])
    truth = np.zeros((2, 16, 16), bool)
    truth[0, 4:8, 4:8] = True
    scores.update(np.zeros((2, 16, 16), np.uint8), truth)  # nothing found
    scores.update(np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), bool))  # a good image, rightly passed
    figures = scores.result()
    assert (figures["dice_defective"], figures["dice"]) == (0.0, 0.5)
    from defectscan.model.metrics import SegmentationScores  # the reference's table beside it, the same way

    table = SegmentationScores(thresholds=(0.5,))
    table.update(np.zeros((2, 16, 16, 2), np.float32), np.stack([truth, np.zeros_like(truth)]).transpose(0, 2, 3, 1).astype(np.float32))
    row = table.result()["thresholds"]["0.5"]
    assert (row["dice_defective"], row["dice"], row["iou"]) == pytest.approx((0.0, 0.5, 0.5), abs=1e-5)
