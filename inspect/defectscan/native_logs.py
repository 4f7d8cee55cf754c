"""TensorFlow's start-up lines kept off the user's terminal.

TensorFlow's C++ side writes straight to file descriptor 2 while it loads and probes devices
("All log messages before absl::InitializeLog() is called...", "oneDNN custom operations are
on", "Could not find cuda drivers", "failed call to cuInit"), before and regardless of
TF_CPP_MIN_LOG_LEVEL. So the first `import tensorflow` of a process (wherever it happens: keras
imports it too) runs with fd 2 pointed at a temporary file, and the device probe with it; what
was written there is dropped, or replayed when the import fails. Under --log-level DEBUG nothing
is hidden.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send fd 2 to a temporary file for the block; on an exception its text goes to stderr after all."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            os.write(2, sink.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Wraps tensorflow's own loader: the module runs (and probes its devices) with fd 2 quiet."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with quiet_stderr():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the CUDA probe prints too


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate it, we only wrap the loader
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_startup(quiet: bool = True) -> None:
    """Make this process's first TensorFlow import quiet, or (quiet=False, for DEBUG) loud again; a no-op once it is imported."""
    installed = [finder for finder in sys.meta_path if isinstance(finder, _QuietFirstImport)]
    if not quiet:
        for finder in installed:
            sys.meta_path.remove(finder)
    elif not installed and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietFirstImport())
