"""Cell classification with a verified model bundle: crops in, P(ALL) out.

The interpreter is created once. Crops of a frame run as one batch when the model allows
it (CPU); the Edge TPU runs batch 1. Quantization is read from the model's own tensors,
which ``check_tensors`` has matched against the manifest.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from edge.bundle import Bundle, check_tensors, load_bundle
from edge.errors import UserError
from edge.interpreter import as_input, open_interpreter
from edge.splitter import CellSplitter

log = logging.getLogger(__name__)


class Classifier:
    def __init__(self, bundle: Bundle | str | Path, *, num_threads: int = 2, edgetpu: bool = False,
                 cpu_fallback: bool = True, max_batch: int = 32, runtime: str | None = None, splitter: bool = True) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.edgetpu = edgetpu
        self.num_threads = num_threads  # worker processes (edge.workers) open their own interpreters alike
        if edgetpu:
            try:
                self.interpreter = open_interpreter(str(self.bundle.model_path("edgetpu")), num_threads=num_threads,
                                                    edgetpu=True, runtime=runtime)
            except UserError as error:
                if not cpu_fallback:
                    raise
                log.warning("%s; falling back to the CPU model", error)
                self.edgetpu = False
        if not self.edgetpu:
            self.interpreter = open_interpreter(str(self.bundle.model_path("cpu")), num_threads=num_threads, runtime=runtime)
        check_tensors(self.bundle, self.interpreter.get_input_details(), self.interpreter.get_output_details())
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.max_batch = 1 if self.edgetpu else max(1, max_batch)
        self._batch = int(self._input["shape"][0])
        self.size = self.bundle.input_size
        self.contract = self.bundle.contract
        self.threshold = self.bundle.threshold
        self._positive = self.bundle.positive_label
        self._negative = next(label for label in self.bundle.labels if label != self._positive)
        #: A LiteRT interpreter runs one invocation at a time; frames analysed at once take turns here.
        self._turn = threading.Lock()
        #: The bundle's cell splitter, for segmentation: it travels, updates and rolls back with this model.
        #: None when the bundle has none or ``splitter`` is off (``segmentation.learned_split``: its interpreter,
        #: ~3 MB, is then not opened): touching cells are split by the classical rule alone.
        self.splitter = CellSplitter.of(self.bundle, num_threads=num_threads, runtime=runtime) if splitter else None

    def _resize(self, batch: int) -> int:
        """Set the batch size; a model whose graph fixes batch 1 (a Flatten reshape) stays at 1."""
        if batch != self._batch:
            try:
                self.interpreter.resize_tensor_input(self._input["index"], [batch, self.size, self.size, 3])
                self.interpreter.allocate_tensors()
                self._batch = batch
            except (RuntimeError, ValueError):
                log.info("model %s runs one crop at a time (its graph fixes the batch size)", self.bundle.root)
                self.interpreter.resize_tensor_input(self._input["index"], [1, self.size, self.size, 3])
                self.interpreter.allocate_tensors()
                self._batch = self.max_batch = 1
        return self._batch

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        scale, zero_point = self._output["quantization"]
        if self._output["dtype"] == np.float32 or scale == 0:
            return raw.astype(np.float32).reshape(-1)
        return ((raw.astype(np.float32) - zero_point) * scale).reshape(-1)

    def scores(self, crops: np.ndarray) -> np.ndarray:
        """P(ALL) for N crops given as N x S x S x 3 uint8 RGB (``edge.preprocessing`` output)."""
        if len(crops) == 0:
            return np.zeros(0, np.float32)
        if crops.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"crops have shape {crops.shape[1:]}, the model needs {(self.size, self.size, 3)}")
        out = []
        start = 0
        with self._turn:
            while start < len(crops):
                chunk = crops[start:start + self._resize(min(self.max_batch, len(crops) - start))]
                start += len(chunk)
                self.interpreter.set_tensor(self._input["index"], as_input(chunk, self._input))
                self.interpreter.invoke()
                out.append(self._dequantize(self.interpreter.get_tensor(self._output["index"])))
        return np.concatenate(out)

    def self_test(self) -> str | None:
        """Score the bundle's own self-test crops; None when they score as its manifest records,
        else one line saying how far off (a runtime, delegate or file that computes something else).
        A bundle without a self-test is a failure: nothing would show that it works here."""
        record = self.bundle.manifest.get("selftest")
        if not record:
            return (f"bundle {self.bundle.root} records no self-test; add one with "
                    "`quantize selftest BUNDLE --data DIR` (or re-export it)")
        try:
            with np.load(self.bundle.root / record["file"], allow_pickle=False) as archive:
                crops = archive["crops"]
            got = self.scores(crops)
        except (OSError, ValueError, KeyError) as error:
            return f"self-test crops of bundle {self.bundle.root} cannot be scored ({error})"
        expected = np.asarray(record["scores"], dtype=np.float32)
        if got.shape != expected.shape:
            return f"self-test: {len(got)} crops but {len(expected)} recorded scores; re-export the bundle"
        worst = float(np.max(np.abs(got - expected))) if len(got) else 0.0
        if worst > float(record["tolerance"]):
            return (f"self-test failed: scores differ from the recorded ones by up to {worst:.4f} "
                    f"(tolerance {record['tolerance']}); this runtime does not compute what the bundle was made with")
        return None

    def labels(self, scores: np.ndarray) -> list[str]:
        return [self._positive if s >= self.threshold else self._negative for s in scores]
