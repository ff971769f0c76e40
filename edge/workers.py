"""Frames analysed in worker processes (``pipeline.processes = true``) instead of threads.

Why: a frame's analysis is hundreds of small OpenCV and NumPy calls per cell, and Python runs one
thread's bytecode at a time. Through the agent on two cores, two analysing threads give ~1.2x one
thread's frames/s and two worker processes ~1.2x the two threads (``benchmarks/bench_pipeline.py``;
the pipeline alone in two processes, ~1.8x one). The price is memory: each process holds its own
interpreter, model and working buffers (~50 MB more per worker, measured as PSS by
``benchmarks/bench_agent.py``), so threads stay the default.

Each worker process is forked from a server that has already imported the pipeline (``forkserver``:
safe beside the agent's threads, and the imported modules' pages are shared). A frame travels through
shared memory, not a pipe; the analysis (cells, verdicts, crops, scores) comes back pickled. A process
that dies is started again; its frame is reported as skipped, never silently lost. The workers ignore the
stop signal (``edge.worker_signals``): the agent stops them once the frames in hand are stored.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import queue
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import UserError
from edge.pipeline import Analysis, Pipeline
from edge.segmentation import SegmentationSettings
from edge.sources import Frame

log = logging.getLogger(__name__)
#: Seconds a worker may take to load a bundle before it is given up as stuck.
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build the same pipeline as the caller's. The bundle is sent apart, as
    an update can change it while the workers run."""

    segmentation: SegmentationSettings
    device_id: str
    num_threads: int
    max_batch: int
    splitter: bool

    @classmethod
    def of(cls, pipeline: Pipeline) -> "WorkerSpec":
        classifier = pipeline.classifier
        return cls(pipeline.segmentation, pipeline.device_id, classifier.num_threads, classifier.max_batch,
                   classifier.splitter is not None)


def _serve(connection: Connection, spec: WorkerSpec) -> None:
    """A worker process: load the bundle it is told, analyse each frame it is handed, until told to stop."""
    import cv2

    import edge.worker_signals  # noqa: F401  # inherited from the fork server already; here should its preload fail
    from edge.classifier import Classifier

    cv2.setNumThreads(1)  # the processes are the parallel unit, as threads are in edge.step.in_order
    pipeline: Pipeline | None = None
    memory: SharedMemory | None = None
    try:
        while True:
            try:
                message = connection.recv()
            except (EOFError, KeyboardInterrupt):
                return
            if message is None:
                return
            kind, *body = message
            try:
                if kind == "bundle":
                    classifier = Classifier(Path(body[0]), num_threads=spec.num_threads, max_batch=spec.max_batch,
                                            splitter=spec.splitter)
                    pipeline = Pipeline(classifier, spec.segmentation, spec.device_id)
                    connection.send(("ok", None))
                    continue
                name, shape, dtype, frame_name = body
                if name is not None and (memory is None or memory.name != name):
                    if memory is not None:
                        memory.close()
                    memory = SharedMemory(name)
                assert pipeline is not None, "a frame before a bundle"
                # No pixels (name None): the pipeline says what is wrong, as it does in the agent's own threads.
                image = np.ndarray(shape, dtype, buffer=memory.buf) if name is not None else np.zeros(shape, dtype)
                try:
                    reply = _analysed(pipeline, Frame(image, frame_name))
                finally:
                    del image  # no view into the shared frame outlives it: the next frame may need a larger buffer
                connection.send(("ok", reply))
            except UserError as error:
                connection.send(("error", str(error)))
            except Exception as error:  # noqa: BLE001  # reported as one line to the agent, traceback here
                log.exception("analysis worker: unexpected error")
                connection.send(("error", f"analysis worker failed: {type(error).__name__}: {error}"))
    finally:
        if memory is not None:
            memory.close()


def _analysed(pipeline: Pipeline, frame: Frame) -> Analysis:
    """The pipeline's analysis without the frame's pixels, which the caller has (pickle sends the classified
    cells once: they are the found ones)."""
    return replace(pipeline.analyse(frame), frame=Frame(None, frame.name))


class _Worker:
    """One worker process, its end of the pipe and the shared frame buffer it reads."""

    def __init__(self, context: Any, spec: WorkerSpec, index: int) -> None:
        self.context, self.spec, self.index = context, spec, index
        self.memory: SharedMemory | None = None
        self.bundle: Path | None = None
        self._start()

    def _start(self) -> None:
        self.connection, child = self.context.Pipe()
        self.process = self.context.Process(target=_serve, args=(child, self.spec), name=f"leukoscope-analyse-{self.index}",
                                            daemon=True)
        self.process.start()
        child.close()
        self.bundle = None

    def _restart(self) -> int | None:
        """Start the process again (killed first if it still runs); the old one's exit code."""
        old = self.process
        if old.is_alive():
            old.kill()
        old.join(timeout=5)
        self.connection.close()
        self._start()
        return old.exitcode

    def _exchange(self, message: tuple, timeout: float | None = None) -> Any:
        try:
            self.connection.send(message)
            if timeout is not None and not self.connection.poll(timeout):
                self._restart()  # a late answer must not be read as the next frame's
                raise UserError(f"analysis worker {self.index} did not answer within {timeout:g} s and was started again")
            status, body = self.connection.recv()
        except (EOFError, OSError):
            code = self._restart()
            raise UserError(f"analysis worker {self.index} exited (exit code {code}) and was started again; "
                            "this frame was not analysed") from None
        if status == "error":
            raise UserError(body)
        return body

    def analyse(self, frame: Frame, bundle: Path) -> Analysis:
        if self.bundle != bundle:
            self._exchange(("bundle", str(bundle)), timeout=LOAD_TIMEOUT_S)
            self.bundle = bundle
        image = np.ascontiguousarray(frame.image)
        if image.size == 0:
            return self._exchange(("frame", None, image.shape, image.dtype.str, frame.name))
        if self.memory is None or self.memory.size < image.nbytes:
            self._free_memory()
            try:
                self.memory = SharedMemory(create=True, size=image.nbytes)
            except OSError as error:
                self.memory = None
                raise UserError(f"no shared memory for analysis worker {self.index} ({error}); free /dev/shm "
                                "or set pipeline.processes = false") from None
        np.copyto(np.ndarray(image.shape, image.dtype, buffer=self.memory.buf), image)
        return self._exchange(("frame", self.memory.name, image.shape, image.dtype.str, frame.name))

    def close(self) -> None:
        try:
            self.connection.send(None)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.connection.close()
        self._free_memory()

    def _free_memory(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory.unlink()
            self.memory = None


class AnalysisProcesses:
    """``Pipeline.analyse`` in ``count`` worker processes: call ``analyse`` from up to ``count`` threads
    at once (``edge.step.in_order``); each call blocks its thread, outside Python's lock, on one process."""

    def __init__(self, pipeline: Pipeline, count: int) -> None:
        spec = WorkerSpec.of(pipeline)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["edge.worker_signals", "edge.pipeline", "edge.classifier"])
        self.bundle = pipeline.classifier.bundle.root
        self._workers: list[_Worker] = []
        # Before multiprocessing's own exit handler, which would ask them to stop with the signal they ignore.
        atexit.register(self.close)
        try:
            for index in range(count):
                self._workers.append(_Worker(context, spec, index))
        except OSError as error:
            self.close()
            raise UserError(f"cannot start the analysis worker processes ({error}); "
                            "set pipeline.processes = false to analyse in threads") from None
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for worker in self._workers:
            self._idle.put(worker)

    def use(self, bundle: Path) -> None:
        """Frames analysed from now on are scored with ``bundle`` (each worker loads it before its next frame)."""
        self.bundle = bundle

    def analyse(self, frame: Frame) -> Analysis:
        worker = self._idle.get()
        try:
            return replace(worker.analyse(frame, self.bundle), frame=frame)
        finally:
            self._idle.put(worker)

    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        """Stop every worker (each after its frame in hand) and free their frame buffers; again is a no-op."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()
        atexit.unregister(self.close)

    def __enter__(self) -> "AnalysisProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
