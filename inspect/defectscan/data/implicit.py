"""Stores without group metadata, as other Zarr writers (tensorstore, acquisition software) make them.

Zarr v3 allows implicit groups: an array at `acq.zarr/images` with only `images/zarr.json`, no
`zarr.json` at the store's root; a store may also be a single array. zarr-python opens such
arrays by path but not as groups. `ImplicitGroup` is the read-only stand-in that the image-set
code needs: arrays found by path, no group attributes (provenance then comes from options).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

METADATA_FILES = ("zarr.json", ".zarray", ".zgroup")


class ImplicitGroup:
    """A store (or folder in one) with no group metadata at `uri`; `root_is_array` when `uri` is an array itself."""

    def __init__(self, uri: str, root_is_array: bool = False):
        self.uri = uri
        self.root_is_array = root_is_array
        self.attrs = MappingProxyType({})

    def __getitem__(self, path: str):
        import zarr

        try:
            return zarr.open_array(self.uri, path=path, mode="r")
        except Exception:  # zarr raises several types for "nothing there"
            raise KeyError(path) from None

    def __contains__(self, path: str) -> bool:
        try:
            self[path]
        except KeyError:
            return False
        return True

    def arrays(self):
        """Arrays directly below the root (local stores; remote ones list nothing), for error messages."""
        root = Path(self.uri)
        if "://" in self.uri or not root.is_dir():
            return []
        return [(child.name, None) for child in sorted(root.iterdir()) if any((child / f).is_file() for f in METADATA_FILES)]


def holds_zarr(path: Path, depth: int = 4) -> bool:
    """True when a Zarr metadata file is at `path` or in a folder up to `depth` levels below it."""
    if any((path / f).is_file() for f in METADATA_FILES):
        return True
    if depth == 0 or not path.is_dir():
        return False
    return any(holds_zarr(child, depth - 1) for child in path.iterdir() if child.is_dir())
