"""Per-crop latency and size: int8 edge model vs its float TFLite twin vs the int8 published (seed) CNN.

    python benchmarks/bench_models.py --edge-run runs/edge [--seed-run runs/seed] [--bundle models/default]

Without a seed run, the published CNN's architecture is built untrained at 256 px and calibrated on
random crops: latency and size of an int8 graph do not depend on what its weights learnt.

All three are timed in the same process with the same LiteRT interpreter settings (batch 1, as a
device classifies crop by crop on the Edge TPU, and batched for the CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def latency_ms(model_path: Path, size: int, threads: int, repeats: int, batch: int = 1) -> dict:
    from edge.interpreter import open_interpreter

    interpreter = open_interpreter(str(model_path), num_threads=threads)
    detail = interpreter.get_input_details()[0]
    if batch != 1:
        try:
            interpreter.resize_tensor_input(detail["index"], [batch, size, size, 3])
            interpreter.allocate_tensors()
        except RuntimeError:
            return {"median_ms_per_crop": None, "note": "the graph fixes batch 1 (Flatten reshape)"}
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (batch, size, size, 3)).astype(detail["dtype"])
    for _ in range(5):
        interpreter.set_tensor(detail["index"], data)
        interpreter.invoke()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        interpreter.set_tensor(detail["index"], data)
        interpreter.invoke()
        times.append((time.perf_counter() - started) * 1000 / batch)
    return {"median_ms_per_crop": round(float(np.median(times)), 3), "p90_ms_per_crop": round(float(np.percentile(times, 90)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge-run", type=Path, default=Path("runs/edge"))
    parser.add_argument("--seed-run", type=Path, default=None, help="a `trainer fit --model seed` run (default: untrained)")
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    import keras

    from edge.bundle import load_bundle
    from quantize.export import convert_float, convert_int8
    from trainer import SEED_INPUT_SIZE
    from trainer.models import seed_model

    import contextlib
    import sys

    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    quiet = contextlib.redirect_stdout(sys.stderr)  # the converter prints to stdout; keep stdout pure JSON
    quiet.__enter__()
    bundle = load_bundle(args.bundle)
    edge_int8 = bundle.model_path("cpu")
    edge_size = bundle.input_size
    edge_float = work / "edge_float.tflite"
    edge_float.write_bytes(convert_float(keras.models.load_model(args.edge_run / "model.keras"), edge_size))

    seed_size = SEED_INPUT_SIZE
    seed = keras.models.load_model(args.seed_run / "model.keras") if args.seed_run else seed_model(seed_size)
    calibration = np.random.default_rng(0).integers(0, 256, (32, seed_size, seed_size, 3)).astype(np.uint8)
    seed_int8 = work / "seed_int8.tflite"
    seed_int8.write_bytes(convert_int8(seed, seed_size, calibration))

    quiet.__exit__(None, None, None)
    models = {
        "edge_int8": (edge_int8, edge_size),
        "edge_float32": (edge_float, edge_size),
        "seed_int8": (seed_int8, seed_size),
    }
    report = {"seed_weights": str(args.seed_run) if args.seed_run else "untrained (latency and size only)", "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                          "threads": args.threads}, "models": {}}
    for name, (path, size) in models.items():
        report["models"][name] = {"input": f"{size}x{size}x3", "bytes": path.stat().st_size,
                                  "batch1": latency_ms(path, size, args.threads, args.repeats),
                                  "batch16": latency_ms(path, size, args.threads, max(5, args.repeats // 5), batch=16)}
    m = report["models"]
    report["ratios"] = {
        "seed_int8_over_edge_int8_latency": round(m["seed_int8"]["batch1"]["median_ms_per_crop"] / m["edge_int8"]["batch1"]["median_ms_per_crop"], 1),
        "seed_int8_over_edge_int8_size": round(m["seed_int8"]["bytes"] / m["edge_int8"]["bytes"], 1),
        "edge_float_over_edge_int8_latency": round(m["edge_float32"]["batch1"]["median_ms_per_crop"] / m["edge_int8"]["batch1"]["median_ms_per_crop"], 2),
        "edge_float_over_edge_int8_size": round(m["edge_float32"]["bytes"] / m["edge_int8"]["bytes"], 2),
    }
    report["float_vs_int8_decision_agreement"] = bundle.manifest["metrics"]["parity"]["decision_agreement"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
