"""`defectscan ingest | imagesets` (lands with the image-set issue)."""

from defectscan.cli.app import not_yet_available

ingest = not_yet_available("ingest", "Ingest image files into a Zarr image set.", "defectscan ingest images/*.png --lot L042 --out L042.zarr")
imagesets = not_yet_available("imagesets", "Register, list, show and validate image sets.", "defectscan imagesets list")
