"""Verdict accuracy on real-photograph surfaces, measured through the user's own path.

Builds a DAGM-layout dataset on real photos (defectscan.data.surfaces: one class folder per
surface), fine-tunes a model on its Train split with `defectscan train`, registers it, ingests each
surface's Test images as a lot, inspects them with `defectscan inspect` (a local Dask cluster,
an isolated SQLite results database under the working folder), reads the verdicts and defects
back with `defectscan images list` / `defectscan defects list`, and scores them against the DAGM
labels. `defectscan evaluate` on the same images gives Dice at the model's operating point and a
second count of TPR/TNR, which must agree with inspect's.

    # the fine-tuning recipe on all four surfaces (about 10-15 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_accuracy.py
    .venv/bin/python benchmarks/bench_accuracy.py --recipe configs/model/tinyunet-finetune.yaml \\
        --surfaces moon,tissue,terrain,deep_field --train 40 --test 40 --size 512 --out var/bench-accuracy --keep

    # a tiny end-to-end check (a minute or two)
    .venv/bin/python benchmarks/bench_accuracy.py --surfaces moon,terrain --train 8 --test 6 --size 128 \\
        --set train.steps=4 --set train.whole_image_steps=2 --set validation.every=2 --set data.crop_size=64

    # the shipped demo model on its own synthetic set (no training; groups named Class1..Class4)
    .venv/bin/defectscan data synth var/demo-synth --classes 4 --train 100 --test 50 --seed 0
    .venv/bin/python benchmarks/bench_accuracy.py --model inspect/defectscan/model/demo/tinyunet-synth-demo.keras \\
        --dataset var/demo-synth --dagm-split Test --json benchmarks/results/accuracy-demo.json

Targets (per surface and overall): TPR 1.00 (no escapes), TNR >= 0.985, Dice >= 0.9 (evaluate's
Dice over all images at the operating point). Prints figures and writes JSON to
benchmarks/results/accuracy.json (or --json PATH). The working folder (dataset, run, image sets,
database) is a temporary one removed at the end unless --out is given or --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RECIPE = "configs/model/tinyunet-finetune.yaml"
TARGETS = {"tpr": 1.0, "tnr": 0.985, "dice": 0.9}
PAGE = 1000


# ---- running the CLI ----


def defectscan_binary() -> str:
    beside = Path(sys.executable).with_name("defectscan")
    found = str(beside) if beside.exists() else shutil.which("defectscan")
    if not found:
        sys.exit("defectscan not found: run with the project's venv, e.g. .venv/bin/python benchmarks/bench_accuracy.py")
    return found


def cli_env(out: Path) -> dict[str, str]:
    """Every subprocess uses the working folder's own results database and data directory."""
    env = dict(os.environ)
    env["DEFECTSCAN_DATABASE_URL"] = f"sqlite:///{out / 'results.sqlite'}"
    env["DEFECTSCAN_DATA_DIR"] = str(out)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def cli(env: dict[str, str], *args, check: bool = True) -> subprocess.CompletedProcess:
    """Run `defectscan ARGS` from the repository root; on failure show its output and stop."""
    command = [defectscan_binary(), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        print(f"\nFAILED (exit {result.returncode}): {' '.join(command)}", file=sys.stderr)
        print(result.stdout[-3000:], file=sys.stderr)
        print(result.stderr[-6000:], file=sys.stderr)
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    return result


def timed_cli(env: dict[str, str], *args) -> tuple[subprocess.CompletedProcess, float]:
    began = time.perf_counter()
    result = cli(env, *args)
    return result, time.perf_counter() - began


# ---- dataset and truth ----


def build_dataset(args, root: Path) -> Path:
    from defectscan.data.surfaces import SurfaceSpec, write_surfaces_dagm

    spec = SurfaceSpec(surfaces=tuple(args.surfaces.split(",")), train=args.train, test=args.test, size=args.size, seed=0,
                       contrast=args.defect_contrast)
    summary = write_surfaces_dagm(root, spec)
    print(f"dataset: {summary.images} images ({summary.defective} defective), {len(spec.surfaces)} surfaces, "
          f"{args.size}x{args.size}, defect contrast {spec.contrast[0]:g}..{spec.contrast[1]:g} local std -> {root}")
    return root


def group_names(root: Path) -> dict[str, str]:
    """ClassN -> surface name (surfaces.json), or ClassN -> ClassN for a dataset without one."""
    from defectscan.data.dagm import class_folders

    named = root / "surfaces.json"
    surfaces = json.loads(named.read_text()) if named.is_file() else {}
    return {folder.name: surfaces.get(folder.name, folder.name) for folder in class_folders(root)}


def read_truth(root: Path, group: str, split: str) -> dict[str, dict]:
    """file name -> {"defective": bool, "label": (H, W) bool weak label}, read as training and evaluate read them."""
    from defectscan.data.dagm import read_dagm

    images = read_dagm(root, split=split, classes=[group])
    return {Path(key).name: {"defective": defective, "label": images.load(i)[1] > 0}
            for i, (key, defective) in enumerate(zip(images.keys, images.defective, strict=True))}


# ---- model: train, register, operating point ----


def train(args, root: Path, out: Path, env) -> tuple[Path, float]:
    overrides = [x for item in args.set or [] for x in ("--set", item)]
    result, seconds = timed_cli(env, "train", args.recipe, "--data", root, "--out", out / "run", "--quiet", *overrides)
    print(f"trained in {seconds:.1f} s: " + " | ".join(result.stdout.strip().splitlines()))
    return out / "run" / "model.keras", seconds


def register(model_path: Path, env) -> str:
    """Register the file (sidecar read by `models register`); reuse an identical registration on a rerun."""
    sidecar = model_path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    name, version = meta.get("name"), meta.get("version")
    naming = [] if name and version else ["--name", name or model_path.stem, "--version", version or "1"]
    ref = f"{name or model_path.stem}:{version or '1'}"
    shown = cli(env, "models", "show", ref, check=False)
    if shown.returncode == 0:
        if json.loads(shown.stdout)["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest():
            print(f"model {ref} already registered in this database (same file)")
            return ref
        sys.exit(f"model {ref} is registered in {env['DEFECTSCAN_DATABASE_URL']} with another file: use a fresh --out")
    print(cli(env, "models", "register", model_path, *naming).stdout.strip())
    return ref


def operating_point(ref: str, env) -> dict:
    return json.loads(cli(env, "models", "show", ref).stdout)["operating_point"] or {}


# ---- inspection and the query CLI ----


def ingest_and_inspect(lot: str, split_dir: Path, files: list[str], ref: str, out: Path, env) -> dict:
    store = out / "sets" / f"{lot}.zarr"
    _, ingest_s = timed_cli(env, "ingest", *(split_dir / f for f in files), "--lot", lot, "--line", "bench",
                            "--product", lot, "--camera", "cam", "--out", store)
    _, inspect_s = timed_cli(env, "inspect", "--model", ref, "--imageset", store, "--no-progress")
    return {"ingest_s": round(ingest_s, 1), "inspect_s": round(inspect_s, 1)}


def query(env, what: str, lot: str, ref: str) -> list[dict]:
    """Every row of `defectscan images|defects list --lot LOT --model REF --format json`, page by page."""
    rows: list[dict] = []
    while True:
        page = json.loads(cli(env, what, "list", "--lot", lot, "--model", ref, "--format", "json",
                              "--limit", PAGE, "--offset", len(rows)).stdout)
        rows.extend(page)
        if len(page) < PAGE:
            return rows


def score_lot(truth: dict[str, dict], images: list[dict], defects: list[dict]) -> dict:
    """Confusion counts of inspect's verdicts against the labels, and box overlap of the detections."""
    from defectscan.model.operating_point import boxes_overlap

    verdicts = {row["image_key"]: row["verdict"] for row in images}
    unknown = sorted(set(verdicts) - set(truth))
    if unknown:
        raise SystemExit(f"inspected images not in Labels.txt: {unknown[:5]}")
    boxes: dict[str, list] = {}
    for d in defects:
        boxes.setdefault(d["image_key"], []).append((d["bbox_y0"], d["bbox_x0"], d["bbox_y1"], d["bbox_x1"]))
    counts = {"tp": 0, "tn": 0, "fp": 0, "fn": 0}
    errors = missing = hits = 0
    for key, t in truth.items():
        verdict = verdicts.get(key)
        if verdict is None or verdict == "error":
            missing += verdict is None
            errors += verdict == "error"
            continue
        failed = verdict == "fail"
        counts[("tp" if failed else "fn") if t["defective"] else ("fp" if failed else "tn")] += 1
        if failed and t["defective"] and boxes_overlap(boxes.get(key, []), t["label"][None]):
            hits += 1
    return finish({**counts, "errors": errors, "not_inspected": missing, "box_hits": hits})


def finish(counts: dict) -> dict:
    """Rates from confusion counts (also used to sum surfaces into the overall figures)."""
    tp, tn, fp, fn = (counts[k] for k in ("tp", "tn", "fp", "fn"))
    tpr = tp / (tp + fn) if tp + fn else None
    tnr = tn / (tn + fp) if tn + fp else None
    return {
        **counts, "images": tp + tn + fp + fn, "defective": tp + fn, "tpr": tpr, "tnr": tnr,
        "escape_rate": None if tpr is None else 1 - tpr, "false_call_rate": None if tnr is None else 1 - tnr,
        "box_overlap": f"{counts['box_hits']}/{tp}",
    }


def total(figures: list[dict]) -> dict:
    keys = ("tp", "tn", "fp", "fn", "errors", "not_inspected", "box_hits")
    return finish({k: sum(f[k] for f in figures) for k in keys})


# ---- evaluate: Dice at the operating point ----


def evaluate(model_path: Path, root: Path, split: str, out: Path, env) -> tuple[dict, float]:
    path = out / "evaluation.json"
    _, seconds = timed_cli(env, "evaluate", model_path, "--data", root, "--split", split, "--json", path)
    return json.loads(path.read_text())["verdict_rule"], seconds


def evaluate_group(rule: dict, group: str, n_groups: int) -> dict:
    """Evaluate's figures for one ClassN (its overall figures when the dataset has one group only)."""
    return rule if n_groups == 1 else rule.get("groups", {}).get(group, {})


# ---- printing ----


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[tuple[str, str, dict, dict]]) -> None:
    head = (f"{'surface':<12} {'class':<7} {'images':>6} {'defect':>6} {'TP':>4} {'TN':>4} {'FP':>4} {'FN':>4} "
            f"{'TPR':>6} {'TNR':>6} {'escape':>6} {'f-call':>6} {'box':>7}  {'Dice':>6} {'Dice-d':>6}  {'evTPR':>6} {'evTNR':>6}")
    print(head)
    print("-" * len(head))
    for name, group, f, e in rows:
        print(f"{name:<12} {group:<7} {f['images']:>6} {f['defective']:>6} {f['tp']:>4} {f['tn']:>4} {f['fp']:>4} {f['fn']:>4} "
              f"{fmt(f['tpr']):>6} {fmt(f['tnr']):>6} {fmt(f['escape_rate']):>6} {fmt(f['false_call_rate']):>6} {f['box_overlap']:>7}  "
              f"{fmt(e.get('dice')):>6} {fmt(e.get('dice_defective')):>6}  {fmt(e.get('tpr')):>6} {fmt(e.get('tnr')):>6}")


def agreement(rows: list[tuple[str, str, dict, dict]]) -> list[str]:
    """Where inspect's confusion counts differ from evaluate's (empty when they all agree)."""
    return [
        f"{name}: inspect {[f[k] for k in ('tp', 'tn', 'fp', 'fn')]} vs evaluate {[e.get(k) for k in ('tp', 'tn', 'fp', 'fn')]} (tp, tn, fp, fn)"
        for name, _, f, e in rows
        if any(f[k] != e.get(k) for k in ("tp", "tn", "fp", "fn"))
    ]


def target_check(name: str, f: dict, e: dict) -> dict:
    checks = {
        "tpr": f["tpr"] is not None and f["tpr"] >= TARGETS["tpr"],
        "tnr": f["tnr"] is not None and f["tnr"] >= TARGETS["tnr"],
        "dice": e.get("dice") is not None and e["dice"] >= TARGETS["dice"],
    }
    marks = "  ".join(f"{k.upper()} {fmt(v)} {'met' if checks[k] else 'NOT met'}" for k, v in
                      (("tpr", f["tpr"]), ("tnr", f["tnr"]), ("dice", e.get("dice"))))
    print(f"{name:<12} {marks}")
    return checks


def print_operating_point(ref: str, point: dict) -> None:
    rule = ", ".join(f"{k} {point.get(k)}" for k in ("threshold", "min_defect_area", "fail_score", "target_false_call_rate") if k in point)
    print(f"operating point of {ref}: {rule or 'none recorded'}")
    for key in ("chosen_by", "chosen_on"):
        if point.get(key):
            print(f"  {key.replace('_', ' ')}: {point[key]}")
    figures = point.get("figures") or {}
    if figures:
        print("  validation: " + ", ".join(f"{k} {fmt(figures.get(k))}" for k in ("tpr", "tnr", "dice", "dice_defective")))


# ---- main ----


def working_folder(args) -> tuple[Path, bool]:
    """(folder, whether to remove it at the end)."""
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return Path(args.out).resolve(), False
    return Path(tempfile.mkdtemp(prefix="bench-accuracy-")), not args.keep


def run(args, out: Path) -> dict:
    env = cli_env(out)
    cli(env, "db", "upgrade")
    if args.model:
        root, model_path, train_s = Path(args.dataset).resolve(), Path(args.model).resolve(), None
    else:
        root = build_dataset(args, out / "data")
        model_path, train_s = train(args, root, out, env)
    ref = register(model_path, env)
    point = operating_point(ref, env)
    groups = group_names(root)

    per_lot, stage_s = {}, {}
    for group, name in groups.items():
        split_dir = root / group / args.dagm_split
        truth = read_truth(root, group, args.dagm_split)
        stage_s[name] = ingest_and_inspect(name, split_dir, list(truth), ref, out, env)
        per_lot[group] = score_lot(truth, query(env, "images", name, ref), query(env, "defects", name, ref))
        print(f"{name}: ingested in {stage_s[name]['ingest_s']} s, inspected in {stage_s[name]['inspect_s']} s")
    overall = total(list(per_lot.values()))
    rule, evaluate_s = evaluate(model_path, root, args.dagm_split, out, env)
    print(f"evaluated in {evaluate_s:.1f} s (evaluate's box overlap: {rule.get('detected_with_box_overlap')})")

    rows = [(name, group, per_lot[group], evaluate_group(rule, group, len(groups))) for group, name in groups.items()]
    rows.append(("overall", "", overall, rule))
    print()
    print(f"model {ref} ({model_path}), {args.dagm_split} split of {root}")
    print_operating_point(ref, point)
    print(f"training seconds: {fmt(train_s, 1) if train_s is not None else '- (existing model)'}")
    print()
    print("inspect (verdicts via `images list`, boxes via `defects list`) | evaluate at the operating point (Dice, TPR, TNR)")
    print_table(rows)
    differences = agreement(rows)
    print("inspect and evaluate agree on every count" if not differences else "inspect and evaluate DISAGREE:\n  " + "\n  ".join(differences))
    print()
    print(f"targets: TPR >= {TARGETS['tpr']:.2f}, TNR >= {TARGETS['tnr']}, Dice >= {TARGETS['dice']}")
    checks = {name: target_check(name, f, e) for name, _, f, e in rows}
    all_met = all(all(c.values()) for c in checks.values())
    print(f"all targets {'met' if all_met else 'NOT met'}")

    return {
        "benchmark": "verdict accuracy", "model": ref, "model_path": str(model_path), "dataset": str(root),
        "split": args.dagm_split, "recipe": None if args.model else args.recipe, "overrides": args.set or [],
        "spec": None if args.model else {"surfaces": args.surfaces.split(","), "train": args.train, "test": args.test, "size": args.size, "seed": 0,
                                         "defect_contrast": list(args.defect_contrast)},
        "cores": os.cpu_count(), "training_seconds": None if train_s is None else round(train_s, 1),
        "evaluate_seconds": round(evaluate_s, 1), "stage_seconds": stage_s, "operating_point": point,
        "surfaces": {name: {"class": group, "inspect": f, "evaluate": {k: v for k, v in e.items() if k != "groups"}, "targets": checks[name]}
                     for name, group, f, e in rows if group},
        "overall": {"inspect": overall, "evaluate": {k: v for k, v in rule.items() if k != "groups"}, "targets": checks["overall"]},
        "inspect_evaluate_agree": not differences, "disagreements": differences,
        "targets": TARGETS, "all_targets_met": all_met,
    }


def contrast_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="working folder, kept (default: a temporary folder, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"training recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--surfaces", default="moon,tissue,terrain,deep_field", help="comma-separated surfaces, one class each")
    parser.add_argument("--train", type=int, default=40, help="Train images per surface")
    parser.add_argument("--test", type=int, default=40, help="Test images per surface")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--defect-contrast", type=contrast_range, metavar="LOW,HIGH",
                        help="defects' contrast in standard deviations of the surface around them "
                             "(default: defectscan.data.surfaces.DEFECT_CONTRAST)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for `defectscan train` (repeatable)")
    parser.add_argument("--model", help="an existing .keras file: no dataset build, no training (needs --dataset)")
    parser.add_argument("--dataset", help="an existing DAGM-layout folder (with --model)")
    parser.add_argument("--dagm-split", default="Test", choices=["Train", "Test"], help="split to inspect and evaluate")
    parser.add_argument("--json", type=Path, default=RESULTS / "accuracy.json", help="where to write the figures")
    args = parser.parse_args()
    if args.defect_contrast is None:
        from defectscan.data.surfaces import DEFECT_CONTRAST

        args.defect_contrast = DEFECT_CONTRAST
    if bool(args.model) != bool(args.dataset):
        parser.error("--model and --dataset go together")

    out, remove = working_folder(args)
    print(f"working folder: {out}{' (removed at the end)' if remove else ''}")
    try:
        figures = run(args, out)
    except subprocess.CalledProcessError:
        sys.exit(1)
    finally:
        if remove:
            shutil.rmtree(out, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
