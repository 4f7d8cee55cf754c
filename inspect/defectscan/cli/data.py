"""`defectscan data`: make synthetic training sets and check datasets before training."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("data")
def data() -> None:
    """Generate and check training datasets.

    \b
    Example:
        defectscan data synth data/synth --classes 4
        defectscan data check data/synth
    """


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", type=click.IntRange(min=1), default=4, show_default=True, help="Class folders (texture + defect kind each).")
@click.option("--train", "n_train", type=click.IntRange(min=0), default=100, show_default=True, help="Train images per class.")
@click.option("--test", "n_test", type=click.IntRange(min=0), default=50, show_default=True, help="Test images per class.")
@click.option("--size", type=click.IntRange(min=32), default=512, show_default=True, help="Image side in pixels (multiple of 16).")
@click.option("--defect-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Share of images with a defect.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same dataset.")
def synth_command(out: Path, classes: int, n_train: int, n_test: int, size: int, defect_fraction: float, seed: int) -> None:
    """Write a DAGM-like synthetic dataset: textured images, defects, weak ellipse labels.

    Class k has its own texture and defect kind (scratch, spot, crack, stain in turn), in the
    DAGM 2007 layout ClassN/{Train,Test}/NNNN.PNG with Label/Labels.txt and Label/NNNN_label.PNG.

    \b
    Example:
        defectscan data synth data/synth --classes 4 --train 100 --test 50 --seed 0
    """
    from defectscan.data.synth import SynthSpec, write_synthetic_dagm

    spec = SynthSpec(classes=classes, train=n_train, test=n_test, size=size, defect_fraction=defect_fraction, seed=seed)
    summary = write_synthetic_dagm(out, spec)
    click.echo(f"{summary.root}: {summary.images} images ({summary.defective} defective) in {classes} classes, {size}x{size}")


@data.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "data_format", type=click.Choice(["dagm", "folders", "zarr"]), default="dagm", show_default=True)
@click.option("--masks", type=click.Path(file_okay=False, path_type=Path), help="Masks folder (folders format).")
@click.option("--split", type=click.Choice(["Train", "Test"]), default="Train", show_default=True, help="DAGM split.")
@click.option("--strict", is_flag=True, help="Stop at the first bad file.")
def check_command(path: Path, data_format: str, masks: Path | None, split: str, strict: bool) -> None:
    """Read a dataset as training would, and list every bad file by name.

    Exits with status 1 when a file had to be skipped.

    \b
    Example:
        defectscan data check data/dagm --split Test
        defectscan data check images/ --format folders --masks masks/
    """
    from defectscan.model.recipe import DataSpec

    spec = DataSpec(format=data_format, path=str(path), masks=str(masks) if masks else None, split=split, strict=strict)
    images = spec.open()
    for problem in images.problems:
        click.echo(f"bad file: {problem}")
    click.echo(images.describe())
    if images.problems:
        raise SystemExit(1)
