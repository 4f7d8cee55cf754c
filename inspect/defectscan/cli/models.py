"""`defectscan train | evaluate | models`: train, evaluate, export and register defect models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.cli.output import output_options, print_rows
from defectscan.model.operating_point import DEFAULT_TARGET_FALSE_CALL_RATE

_RECIPE = click.Path(dir_okay=False, exists=True, path_type=Path)
_CHECK_DATA = click.option(
    "--check-data", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
    help="Labelled images (DAGM layout; its Test split) for the parity check against float32 (default: the model's recorded validation split).",
)


@click.command("train")
@click.argument("recipe", type=_RECIPE)
@click.option("--data", "data_path", metavar="PATH", help="Dataset folder or Zarr store (overrides data.path).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder: checkpoints, logs, model.keras.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. train.steps=100 (repeatable).")
@click.option("--strict", is_flag=True, help="Stop at the first bad file instead of skipping it.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a SavedModel for serving here (signatures serve: uint8 images; serve_uint16: 16-bit images and their bit depth).")
@click.option("--quiet", is_flag=True, help="No progress bar (there is none when stdout is not a terminal either: cron, a log file).")
@pass_app
def train(app: AppContext, recipe: Path, data_path: str | None, out_dir: Path, overrides: tuple[str, ...], strict: bool, export_dir: Path | None,
          quiet: bool) -> None:
    """Train a TinyUNet defect model from a recipe; a rerun resumes from the last checkpoint.

    With validation (the default), the model saved is the best validated step's (or the last's,
    validation.keep) and OUT/model.json records the operating point chosen on the held-out images
    (`models register` reads it).

    \b
    Example:
        defectscan train configs/model/tinyunet-finetune.yaml --data data/line3 --out runs/line3
        defectscan train configs/model/tinyunet-dagm.yaml --data data/dagm --out runs/dagm
        defectscan train configs/model/tinyunet-dagm.yaml --data data/dagm --out runs/quick --set train.steps=200
        defectscan train configs/model/tinyunet-finetune.yaml --data reviewed/L041 --out runs/line3-v4 --set model.init_from=line3:production
    """
    from defectscan.model.recipe import load_recipe
    from defectscan.model.registry import is_registered_reference, resolve_init_from
    from defectscan.model.train import train as run_training

    if strict:
        overrides = (*overrides, "data.strict=true")
    settings = load_recipe(recipe, overrides, data_path)
    if is_registered_reference(settings.model.init_from):
        with app.session() as session:
            donor = resolve_init_from(session, settings)
        click.echo(f"starting from the weights of {donor.name}:{donor.version} ({donor.uri})")
    # Keras's bar writes terminal escapes even into a log file; piped, the recipe's log_every lines say how it goes.
    result = run_training(settings, out_dir, progress=not quiet and sys.stdout.isatty())
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    click.echo(f"trained to step {result.step}{resumed} in {result.seconds:.0f} s, {result.images_per_second:.1f} img/s")
    click.echo(f"last loss {_fmt(result.last_loss)}, Dice@0.5 on the last batch {_fmt(result.last_dice)}")
    if result.finished:
        from defectscan.model.registry import describe_operating_point, sidecar_metadata

        kept = f" (the {settings.validation.keep} validated step, {result.best_step})" if result.best_step is not None else ""
        click.echo(f"model: {result.model_path}{kept}")
        click.echo(f"operating point: {describe_operating_point(sidecar_metadata(result.model_path).operating_point)}")
        if export_dir is not None:
            from defectscan.model.export import export_saved_model

            export_saved_model(result.model_path, export_dir)
            click.echo(f"SavedModel: {export_dir}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"



@click.command("evaluate")
@click.argument("model_ref", metavar="MODEL")
@click.option("--data", "data_path", metavar="PATH", required=True, help="Dataset folder (DAGM layout or images folder) or Zarr store.")
@click.option("--format", "data_format", type=click.Choice(["dagm", "folders", "zarr"]), default="dagm", show_default=True)
@click.option("--split", type=click.Choice(["Train", "Test"]), default="Test", show_default=True, help="DAGM split.")
@click.option("--masks", metavar="DIR", help="Masks folder (folders format).")
@click.option("--class", "classes", multiple=True, metavar="NAME", help="DAGM: ClassN folder to use (repeatable; default all). Folders: class names.")
@click.option("--per-class", is_flag=True, help="DAGM: one class per ClassN folder (for multi-class models).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the metrics as JSON here.")
@click.option("--strict", is_flag=True, help="Stop at the first bad file instead of skipping it.")
@click.option("--bit-depth", type=click.IntRange(9, 16), help="Zarr: the bits 16-bit pixels hold (12 for a 12-bit camera), as registered.")
@click.option(
    "--choose-operating-point",
    is_flag=True,
    help="Choose the verdict rule on these images (use held-out ones, e.g. a validation split) and write it to the model file's sidecar JSON.",
)
@click.option(
    "--target-false-call-rate",
    type=float,
    default=DEFAULT_TARGET_FALSE_CALL_RATE,
    show_default=True,
    help="Highest share of good images failed that the chosen operating point may have.",
)
@pass_app
def evaluate(
    app: AppContext,
    model_ref: str,
    data_path: str,
    data_format: str,
    split: str,
    masks: str | None,
    classes: tuple[str, ...],
    per_class: bool,
    batch_size: int,
    json_path: Path | None,
    strict: bool,
    bit_depth: int | None,
    choose_operating_point: bool,
    target_false_call_rate: float,
) -> None:
    """Score a model on a labelled dataset under its verdict rule (TPR, TNR, escape and false-call rates, Dice, image ROC AUC), then the reference's per-threshold figures.

    MODEL is a .keras file (its operating point read from the sidecar JSON beside it) or a
    registered model (NAME, NAME:VERSION or NAME:STAGE; checked against its sha256; its recorded
    operating point under any inspection.threshold/min_defect_area/fail_score setting, as inspect
    judges).

    \b
    Example:
        defectscan evaluate runs/dagm/model.keras --data data/dagm --json runs/dagm/evaluation.json
        defectscan evaluate tinyunet-dagm:1 --data data/dagm --class Class1
        defectscan evaluate runs/new/model.keras --data data/line3-reviewed --split Train --choose-operating-point
    """
    from pydantic import ValidationError

    from defectscan.errors import DataError
    from defectscan.model.evaluate import evaluate_model, format_table, write_metrics
    from defectscan.model.operating_point import check_target
    from defectscan.model.recipe import DataSpec
    from defectscan.model.registry import record_operating_point

    check_target(target_false_call_rate)
    if not choose_operating_point and _given("target_false_call_rate"):
        raise DataError("--target-false-call-rate is the target of --choose-operating-point; give both, or neither")
    model, rules, sidecar, class_names = _load(app, model_ref)
    try:
        spec = DataSpec(format=data_format, path=data_path, masks=masks, classes=list(classes) or None, per_class=per_class, strict=strict,
                        bit_depth=bit_depth)
    except ValidationError as exc:
        raise DataError("; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())) from None
    images = spec.open(split)
    for problem in images.problems:
        click.echo(f"skipped {problem}", err=True)
    target = target_false_call_rate if choose_operating_point else None
    metrics = evaluate_model(model, images, batch_size=batch_size, rules=rules, choose_for=target, chosen_on=f"{images.name}, {len(images)} images",
                             class_names=class_names)
    if choose_operating_point and metrics["operating_point"] is None:
        raise DataError(metrics["no_operating_point"])
    click.echo(format_table(metrics))
    if json_path is not None:
        click.echo(f"metrics: {write_metrics(metrics, json_path)}")
    if choose_operating_point:
        if sidecar is None:
            click.echo("operating point not recorded: a registered version's rule is fixed; register the file again under a new version with it")
        else:
            click.echo(f"operating point recorded in {record_operating_point(sidecar, metrics['operating_point'])}")


def _given(parameter: str) -> bool:
    """Whether the command's caller gave `parameter` (rather than its default)."""
    return click.get_current_context().get_parameter_source(parameter) is not click.core.ParameterSource.DEFAULT


def _is_model_file(reference: str) -> bool:
    """A .keras path (or any existing file) rather than a registered reference: a folder named `demo` in the working
    directory made `evaluate demo` look for a model file."""
    return reference.endswith(".keras") or Path(reference).is_file()


def _load(app: AppContext, reference: str):
    """(model, its verdict rule, its sidecar path or None, its class names or None) from a .keras path or a registered
    model reference. The class names are those its per-class rules use, as inspect judges."""
    from defectscan.model.export import load_model
    from defectscan.model.registry import load_registered, sidecar_metadata, sidecar_path

    if _is_model_file(reference):
        meta = sidecar_metadata(reference)
        return load_model(reference), meta.rules(), sidecar_path(reference), meta.classes
    from defectscan.pipeline.run import verdict_rules

    with app.session() as session:
        row, model = load_registered(session, reference)
        # The rule `inspect` would judge with: the recorded one under what the settings set over it.
        return model, verdict_rules(row, app.settings.inspection), None, list(row.classes or []) or None


@click.group("models")
def models() -> None:
    """Register, list and show model versions in the results database.

    \b
    Example:
        defectscan models register runs/dagm/model.keras --name tinyunet-dagm --version 1
        defectscan models list
    """


@models.command("register")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=False)
@click.option("--name", help="Model name (default: from --metadata).")
@click.option("--version", "version", help="Version within the name (default: from --metadata).")
@click.option("--metadata", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="JSON/YAML: name, version, classes, threshold, operating_point, training, metrics (default: the sidecar PATH.json when present).")
@click.option("--class", "classes", multiple=True, metavar="NAME", help="Class names in output-channel order (repeatable).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Probability above which a pixel is a defect.")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Evaluation JSON from `defectscan evaluate --json`.")
@click.option("--stage", type=click.Choice(["staging", "production", "archived"]), default="staging", show_default=True)
@click.option("--description", help="Free text.")
@click.option("--demo", is_flag=True, help="Register the demo model shipped with defectscan (no PATH; a no-op when already registered).")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="What workers compute in (default: the metadata's, else float32); other than float32 only after a passed parity check.")
@_CHECK_DATA
@pass_app
def register_command(
    app: AppContext,
    path: Path | None,
    name: str | None,
    version: str | None,
    metadata: Path | None,
    classes: tuple[str, ...],
    threshold: float | None,
    metrics_path: Path | None,
    stage: str,
    description: str | None,
    demo: bool,
    precision: str | None,
    check_data: Path | None,
) -> None:
    """Record a .keras model file with its checksum, classes, threshold, metrics and precision.

    \b
    Example:
        defectscan models register runs/dagm/model.keras --name tinyunet-dagm --version 1 --metrics runs/dagm/evaluation.json
        defectscan models register runs/line3/model.keras --name line3 --version 4 --precision bfloat16 --check-data data/line3-reviewed
        defectscan models register --demo
    """
    from defectscan.errors import ModelError
    from defectscan.model.registry import (describe_operating_point, describe_precision, read_metadata, read_metrics, register_demo,
                                           register_model, sidecar_metadata)

    if demo:
        given = [option for option, value in (("PATH", path), ("--name", name), ("--version", version), ("--metadata", metadata),
                                              ("--class", classes), ("--threshold", threshold), ("--metrics", metrics_path),
                                              ("--description", description), ("--precision", precision), ("--check-data", check_data))
                 if value] + (["--stage"] if _given("stage") else [])
        if given:
            raise ModelError(f"--demo registers the shipped demo model as it ships; it takes no {', '.join(given)}")
        with app.session() as session:
            row = register_demo(session)
            click.echo(f"demo model {row.name}:{row.version} ({row.architecture}) sha256 {row.sha256[:12]} from {row.uri}; stage {row.stage}"
                       + (f" (`defectscan models promote {row.name}:{row.version} --reason ...` to use it again)" if row.stage == "archived" else ""))
        return
    if path is None:
        raise ModelError("give the model file PATH, or --demo for the demo model")
    # Without --metadata, the sidecar that `train` writes beside the model (model.json) is used.
    meta = read_metadata(metadata) if metadata is not None else sidecar_metadata(path)
    metrics = read_metrics(metrics_path) if metrics_path is not None else None
    with app.session() as session:
        row = register_model(
            session,
            path,
            name=name,
            version=version,
            metadata=meta,
            classes=list(classes) or None,
            threshold=threshold,
            metrics=metrics,
            stage=stage,
            description=description,
            precision=precision,
            check_data=check_data,
        )
        click.echo(f"registered {row.name}:{row.version} ({row.architecture}, classes {', '.join(row.classes)}) sha256 {row.sha256[:12]} from {row.uri}; "
                   f"stage {row.stage}")
        click.echo(f"operating point: {describe_operating_point(row.operating_point)}")
        click.echo(f"precision: {describe_precision(row.precision, row.precision_check)}")


@models.command("set-precision")
@click.argument("reference", metavar="MODEL")
@click.argument("precision", type=click.Choice(["float32", "bfloat16", "float16"]))
@_CHECK_DATA
@pass_app
def set_precision_command(app: AppContext, reference: str, precision: str, check_data: Path | None) -> None:
    """Record the precision workers run a model version in, after a parity check against float32 (float32 needs none).

    Accepted when verdicts under the version's operating point agree on at least 99.5 % of the
    labelled images and Dice is within 0.005; the figures are stored with the version. MODEL is a
    registered version (NAME:VERSION) or a .keras file, whose sidecar JSON then records them
    (`models register` reads them from there).

    \b
    Example:
        defectscan models set-precision line3:4 bfloat16 --check-data data/line3-reviewed
        defectscan models set-precision runs/line3/model.keras bfloat16 --check-data data/line3-reviewed
        defectscan models set-precision line3:4 float32
    """
    from defectscan.model.registry import check_file_precision, describe_precision, record_precision, set_precision, sidecar_path

    if _is_model_file(reference):
        check = check_file_precision(reference, precision, check_data)
        click.echo(f"precision: {describe_precision(precision, check.as_dict() if check else None)}")
        click.echo(f"recorded in {record_precision(sidecar_path(reference), precision, check)}")
        return
    with app.session() as session:
        row, _ = set_precision(session, reference, precision, check_data)
        click.echo(f"{row.name}:{row.version} runs in {describe_precision(row.precision, row.precision_check)}")


MODEL_COLUMNS = ("name", "version", "stage", "classes", "threshold", "precision", "dice", "dice_defective", "sha256", "registered_at")


@models.command("list")
@click.option("--name", help="Only this model name.")
@output_options
@pass_app
def list_command(app: AppContext, name: str | None, fmt: str) -> None:
    """List registered model versions: stage, classes, threshold, Dice, checksum.

    \b
    Example:
        defectscan models list
        defectscan models list --name tinyunet-dagm --format json
    """
    from defectscan.model.registry import list_models
    from defectscan.times import iso_utc

    with app.session() as session:
        rows = []
        for row in list_models(session, name):
            # The verdict rule's figures where the metrics have them, else the reference's at 0.5.
            metrics = row.metrics or {}
            figures = metrics.get("verdict_rule") or (metrics.get("thresholds") or {}).get("0.5", {})
            dice, defective = (None if figures.get(k) is None else round(figures[k], 4) for k in ("dice", "dice_defective"))
            values = (row.name, row.version, row.stage, ",".join(row.classes), round(row.threshold, 3), row.precision, dice, defective, row.sha256[:12],
                      iso_utc(row.registered_at))
            rows.append(dict(zip(MODEL_COLUMNS, values, strict=True)))
    print_rows(rows, MODEL_COLUMNS, fmt, empty="no models registered" + (f" named {name}" if name else ""))


@models.command("show")
@click.argument("reference", metavar="MODEL")
@click.option("--verify", is_flag=True, help="Also check the file against the recorded sha256.")
@pass_app
def show_command(app: AppContext, reference: str, verify: bool) -> None:
    """Show one registered model as JSON (the latest version when VERSION is left out), its operating point with the figures it was chosen on.

    \b
    Example:
        defectscan models show tinyunet-dagm:1
        defectscan models show tinyunet-dagm --verify
    """
    from defectscan.model.export import verify_sha256
    from defectscan.model.registry import describe, get_model, to_json

    with app.session() as session:
        row = get_model(session, reference)
    if verify:
        verify_sha256(row.uri, row.sha256)
    click.echo(to_json(describe(row)))
    if verify:
        click.echo(f"{row.uri}: sha256 matches", err=True)


_REASON = click.option("--reason", required=True, metavar="TEXT", help="Why (kept in the version's stage history).")
_BY = click.option("--by", metavar="NAME", help="Who (default: the login name).")


@models.command("promote")
@click.argument("reference", metavar="MODEL")
@_REASON
@_BY
@click.option("--without-comparison", is_flag=True,
              help="Promote although this version was never compared on the plant's images with the one in production (or, while none is, the last one that was).")
@pass_app
def promote_command(app: AppContext, reference: str, reason: str, by: str | None, without_comparison: bool) -> None:
    """Put a model version into production (jobs and inspect use it as NAME:production); the version there before is archived.

    \b
    Example:
        defectscan models promote line3:2 --reason "fewer false calls on L041-L044" --without-comparison
        defectscan models history line3
    """
    from defectscan.model.stages import promote

    with app.session() as session:
        promoted, archived = promote(session, reference, reason=reason, by=by, without_comparison=without_comparison)
        click.echo(f"{promoted.name}:{promoted.version} is in production" + (f"; {archived.name}:{archived.version} archived" if archived else ""))
        click.echo(f"jobs on {promoted.name}:production inspect with it from their next run: every image set they match that it has not "
                   "judged, old ones too (a job source's `since:` limits that)")


@models.command("archive")
@click.argument("reference", metavar="MODEL")
@_REASON
@_BY
@pass_app
def archive_command(app: AppContext, reference: str, reason: str, by: str | None) -> None:
    """Take a model version out of use (its results stay).

    \b
    Example:
        defectscan models archive line3:1 --reason "lamp changed, retrained as line3:2"
    """
    from defectscan.model.stages import archive

    with app.session() as session:
        row = archive(session, reference, reason=reason, by=by)
        click.echo(f"{row.name}:{row.version} archived")


@models.command("history")
@click.argument("name")
@output_options
@pass_app
def history_command(app: AppContext, name: str, fmt: str) -> None:
    """Every stage change of a model name's versions, oldest first: who, when and why.

    \b
    Example:
        defectscan models history line3
    """
    from defectscan.model.stages import HISTORY_COLUMNS, stage_history

    with app.session() as session:
        rows = stage_history(session, name)
    print_rows(rows, HISTORY_COLUMNS, fmt, empty=f"no stage changes of {name}")


@models.command("compare")
@click.argument("candidate", metavar="CANDIDATE")
@click.option("--against", "current", required=True, metavar="MODEL", help="The version to compare with (e.g. NAME:production).")
@click.option("--lot", help="Compare on this lot's image sets.")
@click.option("--imageset", "image_set_ids", multiple=True, metavar="ID|PATH", help="Compare on this image set; repeat for several.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures and every flip here.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a page with the figures, every flip and the first flips drawn side by side.")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler to use; default: a local cluster.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the local cluster.")
@_BY
@pass_app
def compare_command(app: AppContext, candidate: str, current: str, lot: str | None, image_set_ids: tuple[str, ...], json_path: Path | None,
                    html_path: Path | None, scheduler: str | None, workers: int | None, by: str | None) -> None:
    """Inspect with a candidate version where another version has results, and compare (shadow comparison).

    The candidate's results are its own version's rows: what the current version recorded, and
    the lot dispositions and reports made from it, stay as they are. Prints agreement, verdict
    flips each way and, where QA decided images, false calls fixed, new false calls, escapes caught
    and new escapes. The comparison is recorded for `models promote`.

    \b
    Example:
        defectscan models compare line3:3 --against line3:production --lot L042 --html compare-L042.html
    """
    from defectscan.pipeline.shadow import shadow_compare

    settings = app.settings_with(cluster__scheduler=(scheduler, "--scheduler"))
    result = shadow_compare(app.session, settings, candidate, current, lot=lot, image_set_ids=list(image_set_ids), by=by,
                            n_workers=workers, echo=lambda line: click.echo(line, err=True))
    figures = result.figures()
    agreement = "-" if figures["agreement"] is None else f"{100 * figures['agreement']:.1f} %"
    click.echo(f"{result.candidate} against {result.current} on {figures['images']} images ({', '.join(result.lots) or 'no lot'}): "
               f"agreement {agreement}; pass->fail {figures['pass_to_fail']}, fail->pass {figures['fail_to_pass']}")
    click.echo(f"QA-reviewed images {figures['reviewed']}: false calls fixed {figures['false_calls_fixed']}, new false calls "
               f"{figures['new_false_calls']}, escapes caught {figures['escapes_caught']}, new escapes {figures['new_escapes']}")
    if json_path is not None:
        json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if html_path is not None:
        from defectscan.report.comparison import write_comparison_html

        with app.session() as session:
            click.echo(f"wrote {write_comparison_html(session, result, html_path)}")
