"""`defectscan inspect`: run a model over image sets on a Dask cluster (lands with the pipeline)."""

from defectscan.cli.app import not_yet_available

inspect = not_yet_available(
    "inspect",
    "Run a registered model over image sets on a Dask cluster and record the results.",
    "defectscan inspect --model tinyunet-dagm:1 /data/lot-0042.zarr",
)
