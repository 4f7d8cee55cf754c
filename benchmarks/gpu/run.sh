#!/usr/bin/env bash
# The GPU benchmark (docs/gpu.md). On the GPU machine, one device call:
#     bash benchmarks/gpu/run.sh                 (carry: .whl, made by benchmarks/gpu/prepare.sh)
# Here, to prove it: bash benchmarks/gpu/run.sh --cpu   (small sizes, JAX on the CPU, TensorFlow blocked)
set -euo pipefail
cd "$(dirname "$0")/../.."
cpu=0
for arg in "$@"; do [ "$arg" = --cpu ] && cpu=1; done
# The carried wheels are for the GPU machine's Python 3.12; --cpu uses this checkout's .venv instead.
if [ "$cpu" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/inspect${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python=python3
if [ "$cpu" = 1 ]; then
  # The GPU machine has no TensorFlow: any import of it on the inspect path fails here too.
  blocker=$(mktemp -d)
  cat > "$blocker/sitecustomize.py" <<'PY'
import sys


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("TensorFlow is blocked: the GPU machine has none")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
PY
  export PYTHONPATH="$blocker:$PYTHONPATH" JAX_PLATFORMS=cpu
  python=${PYTHON:-.venv/bin/python}
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec timeout 470 "$python" benchmarks/gpu/bench_gpu.py "$@"
