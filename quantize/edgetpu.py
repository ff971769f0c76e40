"""Will this model run on a Coral Edge TPU? Checked from the model itself, compiled only for real.

The rules are Coral's: every tensor 8-bit quantized, static shapes with batch 1, and only
the operators the Edge TPU compiler maps (coral.ai/docs/edgetpu/models-intro). The first
operator outside that list is where the compiler would cut the graph, and everything from
there on would run on the CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS", "FULLY_CONNECTED",
    "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL",
    "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT",
    "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})
INSTALL_HINT = ("edgetpu_compiler is not installed (it runs only on x86-64 Linux): add Coral's apt repository "
                "and `apt-get install edgetpu-compiler`, then export again with --edgetpu")


def check(interpreter) -> dict:
    """The verdict for an opened interpreter: ``compatible`` and, if not, why and where."""
    ops = interpreter._get_ops_details()
    names = [op["op_name"] for op in ops]
    problems = []
    for detail in interpreter.get_input_details():
        signature = [int(d) for d in detail.get("shape_signature", detail["shape"])]
        if any(d < 0 for d in signature) or signature[0] != 1:
            problems.append(f"input shape {signature} is not static with batch 1")
    for detail in interpreter.get_input_details() + interpreter.get_output_details():
        if np.dtype(detail["dtype"]) not in (np.dtype(np.uint8), np.dtype(np.int8)):
            problems.append(f"tensor {detail['name']} is {np.dtype(detail['dtype']).name}, not 8-bit quantized")
    first_cpu_op = next((f"{op['op_name']} (op {op['index']})" for op in ops if op["op_name"] not in EDGETPU_OPS), None)
    if first_cpu_op:
        problems.append(f"operator {first_cpu_op} is not supported by the Edge TPU; it and every op after it would run on the CPU")
    return {
        "compatible": not problems,
        "problems": problems,
        "first_cpu_op": first_cpu_op,
        "op_counts": {name: names.count(name) for name in sorted(set(names))},
    }


def compile_model(model_path: Path, out_dir: Path) -> dict:
    """Run edgetpu_compiler if it is installed; never claims a compile that did not happen."""
    compiler = shutil.which("edgetpu_compiler")
    if not compiler:
        return {"compiled": False, "reason": INSTALL_HINT}
    proc = subprocess.run([compiler, "-s", "-o", str(out_dir), str(model_path)], capture_output=True, text=True)
    compiled = out_dir / f"{model_path.stem}_edgetpu.tflite"
    if proc.returncode != 0 or not compiled.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"compiled": False, "reason": f"edgetpu_compiler failed: {last[0]}"}
    mapped = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", proc.stdout)
    on_cpu = re.search(r"Number of operations that will run on CPU:\s*(\d+)", proc.stdout)
    version = re.search(r"Edge TPU Compiler version\s*(\S+)", proc.stdout)
    (out_dir / f"{model_path.stem}_edgetpu.log").unlink(missing_ok=True)
    return {
        "compiled": True,
        "file": compiled.name,
        "compiler_version": version.group(1) if version else None,
        "ops_on_edgetpu": int(mapped.group(1)) if mapped else None,
        "ops_on_cpu": int(on_cpu.group(1)) if on_cpu else None,
    }
