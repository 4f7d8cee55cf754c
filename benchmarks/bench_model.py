"""TinyUNet throughput: inference img/s at 512x512 (batch 1/8/16, with and without XLA; mixed
precision on GPUs, bfloat16 on CPUs that have it), training img/s, and each row's GFLOP/s as a
share of a matrix multiply measured in the same process, in the same precision.

    .venv/bin/python benchmarks/bench_model.py                 # full run
    .venv/bin/python benchmarks/bench_model.py --quick         # fewer repeats, smaller training batch

Prints a table and writes benchmarks/results/bench_model.json.

FLOPs are counted from the traced graph: every Conv2D op contributes 2 * (output elements) *
(kernel height * kernel width * input channels), i.e. one multiply and one add per
multiply-accumulate. Bias, ReLU, pooling and upsampling are left out (under 1% here).
A training step is counted as 3x the forward FLOPs (forward, input gradients, weight gradients).

The reference is what this machine, at this moment, does on a large square matmul (TensorFlow,
float32 and bfloat16 or float16; numpy's SGEMM too): the CPU model and its clock vary between
machines and a shared machine's load varies between runs, so a ratio measured in one run is the
figure to compare, not GFLOP/s against a peak computed from `lscpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results"


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def matmul_reference(tf, precisions: list[str], n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of an n x n matmul in this process: numpy SGEMM, TensorFlow in each precision's compute dtype."""
    import numpy as np

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    flops = 2 * n**3
    reference = {"numpy_float32": round(flops / time_calls(lambda x: np.matmul(x, b), a, repeats, min_seconds=1.0) / 1e9, 1)}
    dtypes = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}
    for precision in precisions:
        x, y = tf.constant(a, dtype=dtypes[precision]), tf.constant(b, dtype=dtypes[precision])
        multiply = tf.function(lambda x, y=y: tf.matmul(x, y))
        reference[precision] = round(flops / time_calls(multiply, x, repeats, min_seconds=1.0) / 1e9, 1)
    return reference


def conv_flops(model, size: int) -> int:
    """FLOPs of one forward pass on a (1, size, size, 1) image, from the Conv2D ops of the traced graph."""
    import numpy as np
    import tensorflow as tf

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec((1, size, size, 1), tf.float32))
    graphs = [concrete.graph] + [f.graph for f in getattr(concrete.graph, "_functions", {}).values() if hasattr(f, "graph")]
    total = 0
    for graph in graphs:
        for op in graph.get_operations():
            if op.type != "Conv2D":
                continue
            out = op.outputs[0].shape.as_list()
            kernel = op.inputs[1].shape.as_list()
            total += 2 * int(np.prod(out)) * kernel[0] * kernel[1] * kernel[2]
    return total


def time_calls(fn, arg, repeats: int, min_seconds: float) -> float:
    """Seconds per call: one warm-up call, then the median of repeated timings."""
    fn(arg)
    samples = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        result = fn(arg)
        _ = result.numpy() if hasattr(result, "numpy") else result
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 50:
            break
    samples.sort()
    return samples[len(samples) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, training batch 4")
    parser.add_argument("--matmul-size", type=int, default=2048, help="Side of the reference matmul")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_model.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.train_batch, args.train_steps = 2, 4, 2

    import keras
    import numpy as np
    import tensorflow as tf

    from defectscan.model.unet import build_model

    gpus = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else lscpu().get("Model name", "CPU")
    rng = np.random.default_rng(0)
    forward_flops = conv_flops(build_model(seed=0), args.size)
    print(f"device: {device}; TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(f"TinyUNet forward at {args.size}x{args.size}: {forward_flops / 1e9:.2f} GFLOP per image (conv layers)")

    # bfloat16 on CPUs whose vector units have it (AVX512-BF16, AMX): the demo model's stage 2 trains so.
    cpu = {} if gpus else lscpu()
    cpu_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(cpu.get("Flags", "").split()))
    precisions = ["float32"] + (["mixed_float16"] if gpus else ["mixed_bfloat16"] if cpu_bf16 else [])
    reference = matmul_reference(tf, precisions, args.matmul_size, args.repeats)
    print("reference matmul in this process: " + ", ".join(f"{k} {v} GFLOP/s" for k, v in reference.items()))
    inference = []
    for precision in precisions:
        keras.mixed_precision.set_global_policy(precision)
        model = build_model(seed=0)
        for jit in (False, True):
            forward = tf.function(lambda x, model=model: model(x, training=False), jit_compile=jit)
            for batch in args.batches:
                x = tf.constant(rng.uniform(-1, 1, (batch, args.size, args.size, 1)).astype(np.float32))
                seconds = time_calls(forward, x, args.repeats, min_seconds=1.0)
                row = {
                    "precision": precision,
                    "xla": jit,
                    "batch": batch,
                    "images_per_second": round(batch / seconds, 2),
                    "ms_per_batch": round(seconds * 1000, 1),
                    "gflops": round(forward_flops * batch / seconds / 1e9, 1),
                }
                row["of_matmul"] = round(row["gflops"] / reference[precision], 3)
                inference.append(row)
                print(f"inference {precision:<13} xla={jit!s:<5} batch {batch:>3}: {row['images_per_second']:>8.2f} img/s  {row['ms_per_batch']:>8.1f} ms/batch  "
                      f"{row['gflops']:>7.1f} GFLOP/s = {row['of_matmul']:.2f} of the {precision} matmul")
    keras.mixed_precision.set_global_policy("float32")

    from defectscan.model.losses import adaptive_loss

    training = []
    for precision in precisions:
        keras.mixed_precision.set_global_policy(precision)
        for jit in (False, True):
            model = build_model(seed=0)
            optimizer = keras.optimizers.RMSprop(1e-4, rho=0.9, momentum=0.8, centered=True)
            if precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)

            @tf.function(jit_compile=jit)
            def step(batch, model=model, optimizer=optimizer):
                x, y = batch
                with tf.GradientTape() as tape:
                    loss = adaptive_loss(y, model(x, training=True))
                    scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
                optimizer.apply(tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
                return loss

            b = args.train_batch
            x = tf.constant(rng.uniform(-1, 1, (b, args.size, args.size, 1)).astype(np.float32))
            y = tf.constant((rng.random((b, args.size, args.size, 1)) < 0.05).astype(np.float32))
            seconds = time_calls(step, (x, y), args.train_steps, min_seconds=0.0)
            row = {
                "precision": precision,
                "xla": jit,
                "batch": b,
                "images_per_second": round(b / seconds, 2),
                "seconds_per_step": round(seconds, 3),
                "gflops": round(3 * forward_flops * b / seconds / 1e9, 1),
            }
            row["of_matmul"] = round(row["gflops"] / reference[precision], 3)
            training.append(row)
            print(f"training  {precision:<13} xla={jit!s:<5} batch {b:>3}: {row['images_per_second']:>8.2f} img/s  {row['seconds_per_step']:>8.3f} s/step   "
                  f"{row['gflops']:>7.1f} GFLOP/s = {row['of_matmul']:.2f} of the {precision} matmul")
    keras.mixed_precision.set_global_policy("float32")

    report = {
        "device": device,
        "size": args.size,
        "forward_gflop_per_image": round(forward_flops / 1e9, 3),
        "inference": inference,
        "training": training,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": sys.version.split()[0],
    }
    report["matmul_reference_gflops"] = reference
    for precision in precisions:
        best = max((r for r in inference if r["precision"] == precision), key=lambda r: r["gflops"])
        print(f"best {precision} inference: batch {best['batch']} xla={best['xla']}: {best['images_per_second']} img/s, "
              f"{best['gflops']} GFLOP/s = {best['of_matmul']:.2f} of the {precision} matmul ({reference[precision]} GFLOP/s)")
    if len(precisions) > 1:
        fast = max((r for r in inference if r["precision"] == precisions[1]), key=lambda r: r["images_per_second"])
        slow = max((r for r in inference if r["precision"] == "float32"), key=lambda r: r["images_per_second"])
        report["reduced_over_float32"] = round(fast["images_per_second"] / slow["images_per_second"], 2)
        print(f"{precisions[1]} over float32 (best rows, this run): {report['reduced_over_float32']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
