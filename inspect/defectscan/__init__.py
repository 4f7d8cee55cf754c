"""defectscan: industrial defect inspection batch system.

Data path: data (image sets in Zarr) -> pipeline (Dask workers run the UNet) -> db (SQL results)
-> cli / report (what QA engineers read).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
