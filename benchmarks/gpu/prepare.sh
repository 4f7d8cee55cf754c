#!/usr/bin/env bash
# Run here (with network to the package registry), before the device call: fetches, into .whl/ (ignored
# by git, carried by the call), the wheels that the GPU machine's Python 3.12 lacks for defectscan's
# inspect path on the JAX runtime, at the versions of this checkout's .venv. The machine already has
# JAX with CUDA 13, numpy, scikit-image, matplotlib, jinja2, click, rich, pyyaml, msgpack, psutil, ...
# (the device library's KINDS.md); it has no TensorFlow, and none is needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
names="keras namex optree zarr numcodecs donfig google-crc32c sqlalchemy alembic mako pydantic pydantic-core
annotated-types typing-inspection dask distributed partd locket zict tblib tornado croniter pytz"
specs=()
for name in $names; do
  version=$( (.venv/bin/pip show "$name" 2>/dev/null || true) | sed -n 's/^Version: //p')
  specs+=("$name${version:+==$version}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}" 2>&1 | grep -v '^WARNING' || true
ls .whl | wc -l | xargs echo "wheels:"
du -sh .whl
