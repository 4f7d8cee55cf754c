"""`defectscan ingest` and `defectscan imagesets`: image files and acquisition stores -> registered image sets.

Exit status of `ingest` and `imagesets register`: 0 everything went in, 3 some files or images
were skipped (each listed with its reason, the rest went in), 1 nothing could be done (an
`Error:` line), 2 a usage error. `imagesets validate` exits 0 when the store is whole and
unchanged, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.cli.output import ROW_COUNT, output_options, print_rows
from defectscan.exitcodes import EXIT_PARTIAL
from defectscan.times import iso_utc


def _provenance_options(f):
    for option in reversed(
        (
            click.option("--lot", help="Production lot of the images."),
            click.option("--line", help="Production line."),
            click.option("--product", help="Product name or type."),
            click.option("--camera", help="Camera or station that took the images."),
            click.option(
                "--acquired-at",
                metavar="TIME",
                help="Capture time, ISO 8601 (UTC unless it says otherwise), e.g. 2026-03-01T08:00:00Z.",
            ),
        )
    ):
        f = option(f)
    return f


def _report_problems(problems) -> None:
    for problem in problems:
        click.echo(f"skipped {problem}", err=True)


def _time(value: str | None):
    from defectscan.data.imageset import parse_time

    return parse_time(value) if value else None


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="The new Zarr store (default: under the data directory, named by lot and inputs).")
@_provenance_options
@click.option("--kind", type=click.Choice(["stack", "strip"]), default="stack", show_default=True, help="A stack of equal-size images, or one large strip image.")
@click.option("--pad", is_flag=True, help="Pad smaller images (bottom/right, with 0) to the largest instead of skipping them.")
@click.option("--workers", type=click.IntRange(min=1), help="Parallel decoders (default: one per CPU).")
@click.option("--processes", is_flag=True, help="Decode in processes rather than threads.")
@click.option("--strict", is_flag=True, help="Stop at the first bad file instead of skipping it.")
@click.option("--bit-depth", type=click.IntRange(9, 16), metavar="BITS",
              help="Significant bits of 16-bit images (12 for a 12-bit camera); default: all 16.")
@pass_app
def ingest(app: AppContext, paths, out, lot, line, product, camera, acquired_at, kind, pad, workers, processes, strict, bit_depth) -> None:
    """Ingest image files (PNG, TIFF, BMP, JPEG; 8/16-bit; RGB made gray) or a DAGM folder into a new image set, and register it.

    PATHS are image files, folders of them, or DAGM 2007 folders (with Label/Labels.txt;
    their labels go in too). Bad files are listed with their reason and skipped: the exit
    status is then 3. Ingesting the same files into the same store again changes nothing.

    \b
    Example:
        defectscan ingest scans/L042/*.png --lot L042 --line 3 --camera top --out /data/L042.zarr
        defectscan ingest DAGM/Class1/Train --lot dagm-c1 --out dagm-c1.zarr
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from defectscan.data.ingest import IngestOptions
    from defectscan.data.ingest import ingest as run_ingest

    options = IngestOptions(
        lot=lot, line=line, product=product, camera=camera, acquired_at=_time(acquired_at),
        kind=kind, pad=pad, workers=workers, processes=processes, bit_depth=bit_depth,
    )  # fmt: skip
    session = app.session()
    # On a terminal only, as inspect's: piped or in a cron log, the bar left an empty line ahead of the output.
    progress = Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                        disable=not sys.stderr.isatty())
    task = progress.add_task("ingest", total=None)

    def advance(step: int, total: int) -> None:
        progress.update(task, advance=step, total=total)

    with session, progress:
        result, registration = run_ingest(session, paths, out, options, store_dir=app.settings.resolved_data_dir, strict=strict, on_progress=advance)
    _report_problems(result.problems)
    image_set = registration.image_set
    shape = "x".join(str(n) for n in image_set.shape)
    if result.reused:
        click.echo(f"{result.uri}: already holds these {result.n_images} image{'s' if result.n_images != 1 else ''}; image set {image_set.id}")
    else:
        click.echo(
            f"{result.uri}: {result.n_images} image{'s' if result.n_images != 1 else ''} ({shape} {image_set.dtype}) in {result.seconds:.1f} s "
            f"({result.mb_per_second:.1f} MB/s decoded); registered as image set {image_set.id}"
        )
    if result.problems:
        click.echo(result.problems.summary(), err=True)
        sys.exit(EXIT_PARTIAL)


@click.group("imagesets")
def imagesets() -> None:
    """Register, list, show and validate image sets (Zarr stores of inspection images).

    \b
    Example:
        defectscan imagesets register s3://line3/2026-03-01.zarr --array cam0/images --lot L042
        defectscan imagesets list --lot L042
    """


@imagesets.command("register")
@click.argument("url")
@click.option("--array", "array_path", default="images", show_default=True, metavar="PATH", help="Path of the image array inside the store.")
@_provenance_options
@click.option("--bit-depth", type=click.IntRange(9, 16), metavar="BITS",
              help="Significant bits of uint16 images (12 for a 12-bit camera); default: all 16.")
@click.option("--no-chunk-check", is_flag=True, help="Do not list the store's chunks (faster on huge remote stores).")
@pass_app
def register_command(app: AppContext, url, array_path, lot, line, product, camera, acquired_at, bit_depth, no_chunk_check) -> None:
    """Adopt an existing Zarr store (v2 or v3; local path or fsspec URL) without copying it.

    The image array must be (N, H, W) or (H, W), uint8 or uint16 (--bit-depth 12 for 12-bit
    data in 16-bit words), at least 16x16, with whole-image chunks for stacks. Stores of other
    writers are adopted as they are: no group metadata above the array, a store that is one array,
    any standard codec, several images per chunk, sharding. Images with missing chunks are listed and left out
    (exit status 3); registering the store again adds those whose chunks were written since. Registering an
    unchanged store again changes nothing else; a store that changed since it was registered is refused.

    \b
    Example:
        defectscan imagesets register /acq/line3/2026-03-01.zarr --array cam0 --lot L042 --line 3
    """
    from defectscan.data.register import register_store

    with app.session() as session:
        registration = register_store(
            session, url, array_path, lot=lot, line=line, product=product, camera=camera,
            acquired_at=_time(acquired_at), bit_depth=bit_depth, check_chunks=not no_chunk_check,
        )  # fmt: skip
        image_set = registration.image_set
        _report_problems(registration.problems)
        if registration.created:
            click.echo(f"registered image set {image_set.id}: {image_set.uri} ({_summary(image_set)})")
        elif registration.arrived:
            click.echo(f"already registered: image set {image_set.id}: {image_set.uri}; {registration.arrived} of the images left out "
                       f"then are stored now and were added ({_summary(image_set)})")
        else:
            click.echo(f"already registered, unchanged: image set {image_set.id}: {image_set.uri}")
    if registration.problems:
        click.echo(registration.problems.summary(), err=True)
        sys.exit(EXIT_PARTIAL)


def _summary(image_set) -> str:
    shape = "x".join(str(n) for n in image_set.shape)
    return f"{image_set.kind} {shape} {image_set.dtype}, {image_set.n_images} image{'s' if image_set.n_images != 1 else ''}"


def _row(image_set) -> dict:
    return {
        "id": image_set.id,
        "uri": image_set.uri,
        "array": image_set.array_path,
        "kind": image_set.kind,
        "images": image_set.n_images,
        "shape": list(image_set.shape),
        "dtype": image_set.dtype,
        "chunks": list(image_set.chunks),
        "lot": image_set.lot,
        "line": image_set.line,
        "product": image_set.product,
        "camera": image_set.camera,
        "acquired_at": iso_utc(image_set.acquired_at),
        "registered_at": iso_utc(image_set.registered_at),
        "checksum": image_set.checksum,
    }


_LISTED = ("id", "kind", "images", "shape", "dtype", "lot", "line", "product", "camera", "acquired_at", "uri")


@imagesets.command("list")
@click.option("--lot")
@click.option("--line")
@click.option("--product")
@click.option("--limit", type=ROW_COUNT, help="At most this many, newest first.")
@output_options
@click.option("--json", "as_json", is_flag=True, hidden=True, help="The older spelling of --format json.")
@pass_app
def list_command(app: AppContext, lot, line, product, limit, fmt, as_json) -> None:
    """List registered image sets, newest acquisition first (--format json: every field).

    \b
    Example:
        defectscan imagesets list --lot L042
        defectscan imagesets list --format json --limit 10
    """
    from defectscan.data.register import list_image_sets

    with app.session() as session:
        rows = [_row(s) for s in list_image_sets(session, lot=lot, line=line, product=product, limit=limit)]
    fmt = "json" if as_json else fmt
    if fmt in ("json", "ndjson"):
        print_rows(rows, list(rows[0]) if rows else [], fmt, empty="no image sets registered")
    else:
        shown = [{**row, "shape": "x".join(map(str, row["shape"]))} for row in rows]
        print_rows(shown, _LISTED, fmt, empty="no image sets registered")


@imagesets.command("show")
@click.argument("ident", metavar="ID|URI")
@click.option("--keys", "n_keys", type=click.IntRange(min=0), default=5, show_default=True, help="How many image keys to list.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@pass_app
def show_command(app: AppContext, ident, n_keys, as_json) -> None:
    """Show one image set: where it is, its shape and provenance, and its first images.

    \b
    Example:
        defectscan imagesets show 7
        defectscan imagesets show /data/L042.zarr --keys 20
    """
    from defectscan.data.register import get_image_set

    with app.session() as session:
        image_set = get_image_set(session, ident)
        row = _row(image_set)
        attrs = image_set.attrs or {}
        row["labels"] = attrs.get("labels", False)
        row["classes"] = attrs.get("classes", [])
        # Without it a 12-bit set inspected as 16-bit (nearly black) could not be told from the right one.
        row["bit_depth"] = attrs.get("bit_depth") or (16 if image_set.dtype == "uint16" else 8)
        row["skipped"] = attrs.get("skipped", [])
        row["first_images"] = [
            {"position": i.position, "key": i.key, "acquired_at": iso_utc(i.acquired_at)}
            for i in image_set.images[:n_keys]
        ]
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    for name, value in row.items():
        if name in ("first_images", "skipped"):
            continue
        click.echo(f"{name + ':':15}{'-' if value is None else value}")
    click.echo(f"{'skipped:':15}{len(row['skipped'])} at ingest/registration")
    for image in row["first_images"]:
        click.echo(f"  {image['position']:>6}  {image['key']}  {image['acquired_at'] or '-'}")


@imagesets.command("give-up-missing")
@click.argument("ident", metavar="ID|URI")
@click.option("--reason", required=True, metavar="TEXT", help="Why these images will not come (kept with the image set).")
@click.option("--by", metavar="NAME", help="Who (default: the login name).")
@pass_app
def give_up_missing_command(app: AppContext, ident: str, reason: str, by: str | None) -> None:
    """Stop waiting for images whose chunks were not stored when the set was registered.

    Jobs look for them again on every run, add them once written, and report the run partial while
    they are not; for frames that will never come (dropped by the camera), this ends that.

    \b
    Example:
        defectscan imagesets give-up-missing 7 --reason "camera dropped frames 12-14 (ticket 881)"
    """
    from defectscan.data.register import give_up_missing

    with app.session() as session:
        positions = give_up_missing(session, ident, reason, by)
    click.echo(f"image set {ident}: no longer waiting for image{'s' if len(positions) != 1 else ''} at position {', '.join(map(str, positions))}")


@imagesets.command("validate")
@click.argument("ident", metavar="ID|URI")
@click.option("--array", "array_path", metavar="PATH", help="Image array of an unregistered store (default: images).")
@click.option("--deep", is_flag=True, help="Also read and decode every chunk (slow: reads the whole store).")
@pass_app
def validate_command(app: AppContext, ident, array_path, deep) -> None:
    """Re-check an image set's store: layout, the checksum recorded at registration, every chunk present.

    The quick check looks at which chunks are stored; --deep reads and decodes each one, which
    finds damaged chunks too. Works on an unregistered store path (no checksum to compare then).
    Exit status 1 when the store changed or chunks are missing or unreadable (listed by chunk
    index and image position).

    \b
    Example:
        defectscan imagesets validate 7
        defectscan imagesets validate /data/L042.zarr
        defectscan imagesets validate /acq/line3.zarr --array cam0/images
        defectscan imagesets validate 7 --deep
    """
    from defectscan.data.imageset import describe_missing_for_stack
    from defectscan.data.register import validate_image_set

    with app.session() as session:
        report = validate_image_set(session, ident, array_path, deep=deep)
    name = f"image set {report.image_set.id} ({report.uri})" if report.image_set is not None else f"{report.uri} (not registered)"
    if report.ok:
        checksum = "checksum matches, " if report.image_set is not None else ""
        chunks = "every chunk stored and decoded" if deep else "every chunk stored (presence only; --deep decodes them)"
        click.echo(f"{name}: OK: {report.info.n_images} image{'s' if report.info.n_images != 1 else ''}, {checksum}{chunks}")
        return
    if report.changed:
        click.echo(f"{name}: {report.changed}", err=True)
    if report.missing:
        click.echo(f"{name}: {report.missing.describe()}", err=True)
        if report.info.kind == "stack":
            click.echo(f"{name}: {describe_missing_for_stack(report.missing)}", err=True)
    if report.unreadable:
        click.echo(f"{name}: {report.unreadable.describe()}", err=True)
        if report.info.kind == "stack":
            click.echo(f"{name}: image positions in unreadable chunks: {', '.join(map(str, report.unreadable.images[:20]))}", err=True)
    raise click.exceptions.Exit(1)
