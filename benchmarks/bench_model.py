"""TinyUNet throughput: inference img/s at 512x512 (batch 1/8/16, with and without XLA; mixed
precision on GPUs, bfloat16 on CPUs that have it), training img/s, and on CPUs the achieved GFLOP/s against the FMA peak.

    .venv/bin/python benchmarks/bench_model.py                 # full run
    .venv/bin/python benchmarks/bench_model.py --quick         # fewer repeats, smaller training batch

Prints a table and writes benchmarks/results/bench_model.json.

FLOPs are counted from the traced graph: every Conv2D op contributes 2 * (output elements) *
(kernel height * kernel width * input channels), i.e. one multiply and one add per
multiply-accumulate. Bias, ReLU, pooling and upsampling are left out (under 1% here).
A training step is counted as 3x the forward FLOPs (forward, input gradients, weight gradients).

CPU FMA peak = physical cores x clock x FLOP per cycle per core, where
FLOP/cycle = 2 (an FMA is a multiply and an add) x FMA pipes x fp32 lanes per pipe.
From `lscpu`: cores = "Core(s) per socket" x "Socket(s)"; clock = "CPU max MHz" when listed,
else /proc/cpuinfo "cpu MHz", else BogoMIPS / 2 (x86 BogoMIPS is twice the TSC clock); lanes
from the widest vector flag (avx512f: 16, avx2 + fma: 8, else 4). FMA pipes are not in `lscpu`:
2 is assumed (Intel Skylake-SP and later server cores, AMD Zen 1-5). AMD Zen 4 (family 25 with
avx512f) executes 512-bit FMAs on two 256-bit pipes, so its lanes are counted as 8 per pipe.
Override with --fma-pipes / --lanes when the assumption does not hold. A VM often shows only the
nominal clock while the cores boost above it: an achieved figure above 100% of the peak means
the clock is higher than the one used; give the real (boost) clock with --clock-ghz.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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


def cpu_peak(info: dict[str, str], fma_pipes: int | None, lanes: int | None, clock_ghz: float | None = None) -> dict:
    cores = int(info.get("Core(s) per socket", "1")) * int(info.get("Socket(s)", "1"))
    allowed = len(os.sched_getaffinity(0))
    flags = set(info.get("Flags", "").split())
    if clock_ghz is not None:
        mhz, clock_source = clock_ghz * 1000, "--clock-ghz"
    elif "CPU max MHz" in info:
        mhz, clock_source = float(info["CPU max MHz"]), "lscpu CPU max MHz"
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        match = re.search(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo)
        if match:
            mhz, clock_source = float(match.group(1)), "/proc/cpuinfo cpu MHz"
        else:
            mhz, clock_source = float(info.get("BogoMIPS", "0")) / 2, "BogoMIPS / 2"
    zen4 = info.get("Vendor ID") == "AuthenticAMD" and info.get("CPU family") == "25" and "avx512f" in flags
    if lanes is None:
        if "avx512f" in flags and not zen4:
            lanes = 16
        elif "avx2" in flags and "fma" in flags or zen4:
            lanes = 8
        else:
            lanes = 4
    fma_pipes = fma_pipes or 2
    flop_per_cycle = 2 * fma_pipes * lanes
    used_cores = min(cores, allowed)
    return {
        "model": info.get("Model name", platform.processor()),
        "cores": cores,
        "cores_used": used_cores,
        "clock_ghz": round(mhz / 1000, 3),
        "clock_source": clock_source,
        "fma_pipes": fma_pipes,
        "fp32_lanes_per_pipe": lanes,
        "flop_per_cycle_per_core": flop_per_cycle,
        "peak_gflops": round(used_cores * mhz / 1000 * flop_per_cycle, 1),
        "formula": f"{used_cores} cores x {mhz / 1000:.3f} GHz x 2 x {fma_pipes} pipes x {lanes} lanes",
    }


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
    parser.add_argument("--fma-pipes", type=int)
    parser.add_argument("--lanes", type=int)
    parser.add_argument("--clock-ghz", type=float, help="Clock for the peak, e.g. the max boost clock when a VM only shows the nominal one")
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
                inference.append(row)
                print(f"inference {precision:<13} xla={jit!s:<5} batch {batch:>3}: {row['images_per_second']:>8.2f} img/s  {row['ms_per_batch']:>8.1f} ms/batch  {row['gflops']:>7.1f} GFLOP/s")
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
            training.append(row)
            print(f"training  {precision:<13} xla={jit!s:<5} batch {b:>3}: {row['images_per_second']:>8.2f} img/s  {row['seconds_per_step']:>8.3f} s/step   {row['gflops']:>7.1f} GFLOP/s")
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
    if not gpus:
        peak = cpu_peak(cpu, args.fma_pipes, args.lanes, args.clock_ghz)
        # The FMA peak is a float32 one: a bfloat16 dot product (VDPBF16PS) does twice the FLOPs per
        # lane, so bfloat16 rows are measured against twice the peak.
        best = max((r for r in inference if r["precision"] == "float32"), key=lambda r: r["gflops"])
        report["cpu_peak"] = peak
        report["best_inference_fraction_of_peak"] = round(best["gflops"] / peak["peak_gflops"], 3)
        print(f"CPU FMA peak: {peak['peak_gflops']} GFLOP/s = {peak['formula']} (clock from {peak['clock_source']})")
        print(
            f"best float32 inference: batch {best['batch']} xla={best['xla']}: {best['gflops']} GFLOP/s = "
            f"{100 * report['best_inference_fraction_of_peak']:.1f}% of FMA peak"
        )
        bf16 = [r for r in inference if r["precision"] == "mixed_bfloat16"]
        if bf16:
            top = max(bf16, key=lambda r: r["gflops"])
            report["best_bfloat16_inference_fraction_of_peak"] = round(top["gflops"] / (2 * peak["peak_gflops"]), 3)
            print(
                f"best bfloat16 inference: batch {top['batch']} xla={top['xla']}: {top['gflops']} GFLOP/s = "
                f"{100 * report['best_bfloat16_inference_fraction_of_peak']:.1f}% of the bfloat16 peak ({2 * peak['peak_gflops']:.1f} GFLOP/s)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
