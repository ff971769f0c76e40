"""Open a TFLite model with whichever LiteRT runtime the device has.

Tried in order: ``ai_edge_litert`` (LiteRT, the maintained runtime), ``tflite_runtime``
(older Pi images; needs numpy<2), then ``tensorflow.lite`` (workstations). The Edge TPU is
reached through its delegate library, ``libedgetpu.so.1``.
"""

from __future__ import annotations

import importlib
import logging
import platform
from typing import Any

from edge.errors import UserError

log = logging.getLogger(__name__)

RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")
EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}


def _runtime(preferred: str | None = None) -> tuple[str, Any]:
    names = (preferred,) if preferred else RUNTIMES
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return name, module
    raise UserError(
        "no TFLite runtime found; install one: pip install ai-edge-litert "
        "(or tflite-runtime on older Raspberry Pi OS images)"
    )


def open_interpreter(model_path: str, *, num_threads: int = 2, edgetpu: bool = False, runtime: str | None = None,
                     plain_ops: bool = False):
    """An interpreter with tensors allocated; ``UserError`` naming the file or the delegate on failure.

    ``plain_ops`` skips the default XNNPACK delegate, so that the operator list is the model's own
    (for inspection and the Edge TPU check) rather than one DELEGATE node.
    """
    name, module = _runtime(runtime)
    delegates = []
    if edgetpu:
        library = EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
        try:
            delegates = [module.load_delegate(library)]
        except (ValueError, OSError, RuntimeError) as error:
            raise UserError(
                f"Edge TPU delegate {library} could not be loaded ({error}); is the Coral plugged in and "
                "libedgetpu1-std installed? Set classifier.edgetpu = false to run on the CPU"
            ) from None
    try:
        extra = {}
        if plain_ops and hasattr(module, "OpResolverType"):
            extra["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interpreter = module.Interpreter(model_path=str(model_path), num_threads=num_threads,
                                         experimental_delegates=delegates or None, **extra)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{model_path} cannot be loaded as a TFLite model ({first}); re-export the bundle") from None
    log.debug("opened %s with %s (edgetpu=%s, threads=%d)", model_path, name, edgetpu, num_threads)
    return interpreter


def as_input(pixels, detail: dict):
    """Image bytes (uint8) as the input tensor ``detail`` (from ``get_input_details``) takes them: its
    dtype and quantization. A uint8 input with scale 1 and zero point 0, as exported, takes them as they are."""
    import numpy as np

    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    if dtype == np.float32:
        return pixels.astype(np.float32)
    if (scale, zero_point) == (1.0, 0) and dtype == np.uint8:
        return pixels
    info = np.iinfo(dtype)
    return np.clip(np.round(pixels / scale + zero_point), info.min, info.max).astype(dtype)


def op_names(interpreter) -> list[str]:
    """The model's operator names in execution order (``CONV_2D``, ``MEAN``, ...)."""
    return [op["op_name"] for op in interpreter._get_ops_details()]
