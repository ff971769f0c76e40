"""The agent: camera -> bounded queue -> pipeline -> durable outbox -> MQTT, unattended for months.

Threads: capture (reads the source, reopens it with backoff when it fails), inference (hands
``pipeline.workers`` frames at a time to the analysing threads and commits their results in frame
order), the publisher's sender and paho's network thread; the
main thread supervises (watchdog, stats, signals). When the camera outpaces inference, the
oldest waiting frame is dropped and counted: fresh frames matter more than old ones at a
microscope.
"""

from __future__ import annotations

import ctypes
import json
import logging
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge import DISCLAIMER
from edge.calibration import DRIFT_WARNING, Calibration, FrameScale, calibrate, drift, measure_frame
from edge.classifier import Classifier
from edge.commands import CommandHandler, agent_commands, answer, iso_now
from edge.config import AgentConfig, load_config
from edge.errors import UserError
from edge.gate import FRAME_PROBLEMS, FrameLight
from edge.notify import notify, watchdog_interval
from edge.outbox import Outbox
from edge.pipeline import Analysis, Pipeline, ReviewWriter
from edge.results import RUN_ID, SampleTally, numbered
from edge.sources import Frame, resilient
from edge.step import Analysed, FrameStep, in_order
from edge.topics import BY_NAME, Topics
from edge.workers import AnalysisProcesses

log = logging.getLogger(__name__)
STATS_SCHEMA, STATS_SCHEMA_VERSION = "leukoscope/stats", 1  # edge/schemas/stats.schema.json
SUMMARY_EVERY = 10  # frames between retained per-sample summaries
CALIBRATION_FRAMES = 10  # frames measured when the agent calibrates on start
#: Recent frames' red cells whose scale is compared with the configured one. At their true scale, BCCD's and PBC's
#: frames (shuffled, 20 orders) made a window of 5 read over 10% off in 1.6% / 1.4% of its judgements (a false
#: "objective changed?" every ~70 measurements, minutes at 50 frames apart), 9 in 0.3%, 15 in 0.0% / 0.1%. A real
#: change shows after ~8 measurements (~400 frames).
SCALE_WINDOW = 15
#: Pixels of a frame's centre the scale watch measures (red cells ~80 px across: room for dozens). It runs
#: on the path results are committed on, so its cost stalls the analysis: with a whole-frame look every
#: 50 frames, 1080p through the agent lost 8-14% of its frame rate.
SCALE_WATCH_PIXELS = 250_000


def open_frames(config: AgentConfig, stop, on_failure):
    source = config.source
    if source.type == "folder":
        from edge.sources.folder import open_source
    elif source.type == "opencv":
        from edge.sources.opencv import open_source
    else:
        from edge.sources.picamera2 import open_source
    return resilient(lambda: open_source(source), name=f"source {source.type}", stop=stop, on_failure=on_failure)


def grab_frames(config: AgentConfig, count: int) -> list[Frame]:
    """Up to ``count`` readable frames from the configured source (for calibration); a camera that
    fails is one line, not a retry loop."""
    failures: list[str] = []
    stop = threading.Event()

    def failed(reason: str) -> None:
        failures.append(reason)
        stop.set()

    frames: list[Frame] = []
    for frame in open_frames(config, stop.is_set, failed):
        if frame.image is not None:
            frames.append(frame)
        if len(frames) >= count or stop.is_set():
            break
    if not frames:
        raise UserError(f"source {config.source.type} delivered no readable frame" + (f" ({failures[0]})" if failures else "")
                        + "; check the camera or folder")
    return frames


def calibrated(config: AgentConfig) -> AgentConfig:
    """The config with ``segmentation.um_per_px`` measured on the first frames when it is unset and
    ``calibrate_on_start`` asks for it; a scale that cannot be measured stops the agent (one line)."""
    seg = config.segmentation
    if seg.um_per_px is not None or not seg.calibrate_on_start:
        return config
    frames = grab_frames(config, CALIBRATION_FRAMES)
    measured = calibrate([f.image for f in frames])  # type: ignore[misc]
    if measured.um_per_px is None:
        raise UserError(f"calibrate_on_start: too few red cells in the first {len(frames)} frame(s) to measure the scale "
                        f"({measured.red_cells} found); set segmentation.um_per_px (measure it with `edge calibrate`)")
    log.info("calibrated on start: %.4f µm per pixel from %d red cells in %d frames (spread %s)", measured.um_per_px,
             measured.red_cells_used, len(measured.usable), "n/a" if measured.cv is None else f"{measured.cv:.1%}")
    return config.model_copy(update={"segmentation": seg.model_copy(update={"um_per_px": round(measured.um_per_px, 5)})})


class ScaleWatch:
    """Red-cell size watched while the agent runs: every ``every``-th frame is measured (7-24 ms at 1080p and
    12 MP), and the last few frames, weighed as `edge calibrate` weighs them, are compared with the configured
    scale. A drift over 10% means the objective, camera or binning changed, and every size and crop is then wrong."""

    def __init__(self, um_per_px: float, every: int) -> None:
        self.um_per_px = um_per_px
        self.every = every
        self.recent: deque[FrameScale] = deque(maxlen=SCALE_WINDOW)
        self.seen = 0
        self.warned = False

    def observe(self, image: np.ndarray) -> None:
        self.seen += 1
        if not self.every or self.seen % self.every:
            return
        frame = measure_frame(image, expected_um_per_px=self.um_per_px, pixels=SCALE_WATCH_PIXELS)
        if frame.um_per_px is None:
            return
        self.recent.append(frame)
        drifting = self.drift is not None and self.drift > DRIFT_WARNING
        if drifting and not self.warned:
            log.warning("%s", self.message)
            notify(f"STATUS={self.message}")
        self.warned = drifting

    @property
    def measured(self) -> float | None:
        # As `edge calibrate` weighs frames: those of discocytes, where at least three are.
        return Calibration(tuple(self.recent)).um_per_px if len(self.recent) >= min(3, SCALE_WINDOW) else None

    @property
    def drift(self) -> float | None:
        return None if self.measured is None else drift(self.measured, self.um_per_px)

    @property
    def message(self) -> str:
        return (f"scale drift: red cells measure {self.measured:.4f} µm per pixel, {self.drift:.0%} from the configured "
                f"{self.um_per_px}; was the objective changed? run `edge calibrate` and set segmentation.um_per_px")

    def stats(self) -> dict:
        return {"um_per_px": self.um_per_px, "measured_um_per_px": None if self.measured is None else round(self.measured, 5),
                "drift": None if self.drift is None else round(self.drift, 4), "warning": self.message if self.warned else None}


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        config = calibrated(config)
        self.config = config
        self.device_id = config.device.id
        self.topics = Topics(config.mqtt.topic_prefix, self.device_id)
        self.outbox = Outbox(config.outbox.path, max_messages=config.outbox.max_messages, when_full=config.outbox.when_full)
        self.updater = None
        if config.updates.enabled:  # signed bundles sent over MQTT (edge.updates): it knows which bundle is active
            from edge.updates import Updater

            self.updater = Updater(config.updates, config.classifier.bundle, self._classifier, self._install)
            self.classifier = self.updater.start()
        else:
            self.classifier = self._classifier(config.classifier.bundle)
        self.pipeline = Pipeline(self.classifier, config.segmentation.settings(), self.device_id)
        self.scale_watch = ScaleWatch(self.pipeline.um_per_px, config.segmentation.watch_scale_every)
        #: One frame: pipeline -> result numbered and stored in the outbox -> tally -> observers (this agent first).
        self.step = FrameStep(self.pipeline, self._store, [self])
        self.review = ReviewWriter(config.review.folder, self.classifier.bundle.positive_label, config.review.max_files) \
            if config.review.folder else None
        self.publisher = None
        if config.mqtt.enabled:
            from edge.publisher import Publisher

            self.publisher = Publisher(config.mqtt, self.outbox, self.device_id, self.handle_command)
        self.frames: queue.Queue[Frame] = queue.Queue(maxsize=config.pipeline.queue_size)
        self.stop_event = threading.Event()
        self.source_done = threading.Event()
        self.lock = threading.Lock()
        self.tally = SampleTally(config.pipeline.sample_id)
        self.snapshot_requested = False
        #: name -> handler(body) -> reply fields; add entries to add commands (see edge/commands.py).
        self.commands: dict[str, CommandHandler] = agent_commands(self)
        if self.updater:
            self.commands.update(self.updater.commands())
        self.counters = {"frames_captured": 0, "frames_dropped": 0, "frames_processed": 0, "frames_unreadable": 0,
                         "source_failures": 0, "results_refused_outbox_full": 0, "commands": 0, "command_errors": 0,
                         "frames_out_of_focus": 0, **{f"frames_{problem}": 0 for problem in FRAME_PROBLEMS},
                         "cells_unclassified": 0}
        self.out_of_focus = False
        #: What keeps the last frame from showing cells (``gate.FRAME_PROBLEMS``), or None.
        self.frame_problem: str | None = None
        self.web = None  # the local page (edge/web), when [web] enabled: it watches the frame step too
        if config.web.enabled:
            from edge.web import WebPage

            self.web = WebPage(self)
            self.step.observers.append(self.web)
        #: Worker processes analysing frames (``pipeline.processes``), started by ``run``.
        self.analysers: AnalysisProcesses | None = None
        self.stage_ms: dict[str, float] = {}
        self.last_progress = time.monotonic()
        self.started = time.monotonic()

    def _classifier(self, bundle: Path) -> Classifier:
        c = self.config.classifier
        return Classifier(bundle, num_threads=self.config.interpreter_threads, edgetpu=c.edgetpu, cpu_fallback=c.cpu_fallback,
                          max_batch=c.max_batch, splitter=self.config.segmentation.learned_split)


    # -- threads ----------------------------------------------------------------------------
    def _capture(self) -> None:
        def failed(reason: str) -> None:
            self.counters["source_failures"] += 1

        # Replaying files without pacing: wait for room, so that every file is analysed. A camera
        # (or paced replay) does not wait: the oldest waiting frame is dropped and counted.
        replaying = self.config.source.type == "folder" and not self.config.source.fps
        enqueue = self._enqueue_waiting if replaying else self._enqueue_dropping_oldest
        try:
            for frame in open_frames(self.config, self.stop_event.is_set, failed):
                self.counters["frames_captured"] += 1
                enqueue(frame)
        except UserError as error:
            log.error("%s", error)
            self.stop_event.set()
        finally:
            self.source_done.set()

    def _enqueue_waiting(self, frame: Frame) -> None:
        while not self.stop_event.is_set():
            try:
                self.frames.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    def _enqueue_dropping_oldest(self, frame: Frame) -> None:
        while True:
            try:
                self.frames.put_nowait(frame)
                return
            except queue.Full:
                try:
                    self.frames.get_nowait()
                    self.counters["frames_dropped"] += 1
                except queue.Empty:
                    pass

    def _inference(self) -> None:
        """Up to ``pipeline.workers`` frames analysed at once, committed one by one in the order they came."""
        for analysis in in_order(self.step.analyse, self._queued(), self.config.pipeline.workers):
            self._commit(analysis)

    def _queued(self) -> Iterator[Frame | None]:
        """Frames from the capture queue until the source ends or the agent stops (then the queue is
        emptied first); None every 0.1 s without a frame."""
        while True:
            try:
                yield self.frames.get(timeout=0.1)
            except queue.Empty:
                if self.source_done.is_set() or self.stop_event.is_set():
                    return
                yield None

    def _commit(self, analysis: Analysis | tuple[Frame, str]) -> None:
        with self.lock:  # one lock for the model and the tally: a sample starts or stops between frames
            self.step.commit(analysis, self.tally)
        if self.publisher:
            self.publisher.notify()

    def _store(self, result: dict) -> bytes | None:
        """The frame step's store: numbered by the outbox's persistent sequence, in the same transaction."""
        kept: list[bytes] = []

        def render(sequence: int) -> bytes:
            kept.append(numbered(result, sequence))
            return kept[-1]

        if self.outbox.put_numbered(self.topics.results, render) is None:
            self.counters["results_refused_outbox_full"] += 1
            return None
        return kept[-1]

    # -- the frame step's observer (called under the lock, in frame order) ----------------------
    def analysed(self, done: Analysed) -> None:
        """Health counters, scale and focus watch, the running summary, review frames, the log."""
        result, frame = done.result, done.frame
        self.scale_watch.observe(frame.image)  # type: ignore[arg-type]  # analysed frames have an image
        self.counters["cells_unclassified"] += result["counts"]["unclassified"]
        self._watch_focus(result)
        self._watch_light(result)
        self.counters["frames_processed"] += 1
        self.last_progress = time.monotonic()
        for stage, ms in result["timings_ms"].items():
            self.stage_ms[stage] = 0.9 * self.stage_ms.get(stage, ms) + 0.1 * ms
        if self.tally.sample_id is not None and self.tally.frames % SUMMARY_EVERY == 0:
            self._summary(final=False)
        if self.review and (self.snapshot_requested or result["counts"]["blasts"] or self.config.review.all_frames):
            self.review.write(frame.image, result, done.crops)  # type: ignore[arg-type]  # named by the sequence, so after storing
            self.snapshot_requested = False
        if self.config.pipeline.log_results:
            log.info("%s: %d cells, %d flagged as ALL blasts", frame.name, result["counts"]["cells"], result["counts"]["blasts"])

    def skipped(self, frame: Frame, reason: str) -> None:
        self.counters["frames_unreadable"] += 1
        log.warning("skipped %s: %s", frame.name, reason)

    def _watch_focus(self, result: dict) -> None:
        self.counters["frames_out_of_focus"] += result["out_of_focus"]
        if result["focus"] is None:
            return
        self._warn_on_change("out_of_focus", result["out_of_focus"],
                             lambda: f"out of focus: {result['source']} nuclei focus {result['focus']} (below 50); refocus the microscope",
                             lambda: f"back in focus at {result['source']} (nuclei focus {result['focus']})")

    def _watch_light(self, result: dict) -> None:
        """Frames without light, washed out or without colour yield no cells (or few): without these warnings the
        device would find none and say nothing about why."""
        look = FrameLight.from_dict(result["light"])
        problem = look.problem
        if problem:
            self.counters[f"frames_{problem}"] += 1
        ended = self.frame_problem
        self._warn_on_change("frame_problem", problem, lambda: look.warning(result["source"]),
                             lambda: f"{FRAME_PROBLEMS[ended].ended} at {result['source']} ({look.measured()})")  # type: ignore[index]

    def _warn_on_change(self, state: str, now: object, warning: Callable[[], str], ended: Callable[[], str]) -> None:
        """Warn once when a frame condition starts (log and systemd status) and say once when it ends, not every
        frame; the messages are only written then. ``state``: the attribute holding the condition (falsy: none)."""
        if now == getattr(self, state):
            return
        setattr(self, state, now)
        if now:
            message = warning()
            log.warning("%s", message)
            notify(f"STATUS={message}")
        else:
            log.info("%s", ended())

    def _summary(self, *, final: bool) -> dict:
        """Store the open sample's summary (retained) for publishing; the caller holds the lock."""
        assert self.tally.sample_id is not None, "frames outside a sample have no summary"
        summary = self.tally.summary(self.device_id, final=final)
        self.outbox.put(self.topics.sample(self.tally.sample_id), json.dumps(summary).encode(), retain=BY_NAME["samples"].retained)
        if self.publisher:
            self.publisher.notify()
        return summary

    def _install(self, classifier: Classifier) -> None:
        """Make ``classifier`` the one that frames are scored with, between two frames."""
        with self.lock:
            self.classifier = classifier
            self.pipeline.classifier = classifier
            if self.analysers:
                self.analysers.use(classifier.bundle.root)

    # -- sample and model actions (called by the command table, and by any other front end) ------
    def start_sample(self, sample_id: str) -> dict | None:
        """Close the open sample (its final summary is published and returned) and start tallying ``sample_id``."""
        with self.lock:
            closed = self._close_sample()
            self.tally = SampleTally(sample_id)
        log.info("sample %s started", sample_id)
        return closed

    def stop_sample(self) -> dict:
        """Close the open sample and return its final summary; frames analysed after it belong to no sample
        (their results carry ``sample_id: null`` and no summary is kept for them)."""
        with self.lock:
            if self.tally.sample_id is None:
                raise ValueError('no sample is open; start one with start_sample {"sample_id": "BM-42"}')
            closed = self._close_sample()
            self.tally = SampleTally(None)
        assert closed is not None
        return closed

    def current_summary(self) -> dict | None:
        """The open sample's running summary (not published), or None when no sample is open."""
        with self.lock:
            return None if self.tally.sample_id is None else self.tally.summary(self.device_id)

    def request_snapshot(self) -> Path:
        """Save the next analysed frame, annotated, to ``review.folder`` (returned)."""
        if not self.review or not self.config.review.folder:
            raise ValueError("snapshots need review.folder set in the config")
        self.snapshot_requested = True
        return self.config.review.folder

    def reload_model(self, bundle: str | None = None) -> dict:
        """Verify ``bundle`` (default: the configured one) and swap it in; the running model stays on any error.

        Refused while updates are enabled: the updater owns which bundle is active (its ``active`` link
        survives restarts and is what ``update_status`` and ``stats`` report), so a second way to switch
        would let the bundle that scores differ from the one reported."""
        if self.updater:
            raise UserError(f"reload_model is off while updates.enabled: the updater owns the active bundle "
                            f"({self.updater.status()['active']}); send a signed bundle with `quantize publish` "
                            "(update_begin, update_chunk), go back with update_revert, see update_status")
        path = bundle if bundle is not None else str(self.config.classifier.bundle)
        classifier = self._classifier(Path(path))  # verified before it replaces the running one
        self._install(classifier)
        return {"bundle": path, "sha256": classifier.bundle.manifest["files"]}

    def _close_sample(self) -> dict | None:
        """Publish the open sample's final summary (the caller holds the lock); None when none is open."""
        if self.tally.sample_id is None:
            return None
        return self._summary(final=True)

    # -- commands ---------------------------------------------------------------------------
    def handle_command(self, topic: str, payload: bytes) -> None:
        """``cmd/<name>`` through the command table; the reply goes to ``reply/<reply_to or name>``."""
        reply_to, reply = answer(self.commands, self.topics.command_name(topic), payload)
        with self.lock:
            self.counters["commands"] += 1
            self.counters["command_errors"] += not reply["ok"]
        if self.publisher:
            self.publisher.publish_now(self.topics.reply(reply_to), json.dumps(reply, default=str).encode())

    # -- supervision ------------------------------------------------------------------------
    def stats(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "schema": STATS_SCHEMA,
            "schema_version": STATS_SCHEMA_VERSION,
            "time": iso_now(),
            "device_id": self.device_id,
            "run_id": RUN_ID,
            "bundle": self.classifier.bundle.id,
            "sample_id": self.tally.sample_id,
            "uptime_s": round(elapsed, 1),
            "fps": round(self.counters["frames_processed"] / elapsed, 2),
            "stage_ms": {k: round(v, 2) for k, v in self.stage_ms.items()},
            "queue_depth": self.frames.qsize(),
            "outbox_backlog": len(self.outbox),
            "outbox_dropped": self.outbox.dropped,
            "mqtt_connected": bool(self.publisher and self.publisher.connected.is_set()),
            "mqtt_inflight": self.publisher.inflight() if self.publisher else 0,
            "scale": self.scale_watch.stats(),
            "out_of_focus": self.out_of_focus,
            **{problem: self.frame_problem == problem for problem in FRAME_PROBLEMS},
            **self.counters,
        }

    def run(self) -> int:
        previous = {signum: signal.signal(signum, lambda *_: self.stop_event.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.config.pipeline.processes:
                self.analysers = AnalysisProcesses(self.pipeline, self.config.pipeline.workers)
                self.step.analyser = self.analysers.analyse
            return self._run()
        finally:
            if self.analysers:
                self.analysers.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self) -> int:
        log.info("%s", DISCLAIMER)
        if self.web:
            self.web.start()
        if self.publisher:
            self.publisher.start()
        threads = [threading.Thread(target=self._capture, name="capture", daemon=True),
                   threading.Thread(target=self._inference, name="inference", daemon=True)]
        for thread in threads:
            thread.start()
        notify("READY=1")
        notify(f"STATUS=analysing frames from {self.config.source.type} source")
        watchdog = watchdog_interval()
        next_watchdog = next_stats = time.monotonic()
        failed = False
        while not self.stop_event.is_set() and threads[1].is_alive():
            now = time.monotonic()
            if self.publisher and self.publisher.fatal:
                log.error("%s", self.publisher.fatal)
                self.stop_event.set()
                break
            if self.publisher and not self.publisher.sending():
                # Analysing on without delivering would only fill the outbox: exit 1, and systemd
                # (Restart=on-failure) starts a fresh agent that sends the outbox from the start.
                log.error("the publisher's sending thread died (traceback above); stopping with exit status 1 "
                          "so that the service restarts; the outbox keeps every result")
                failed = True
                break
            stalled = now - self.last_progress > self.config.pipeline.watchdog_stall_s
            if watchdog and now >= next_watchdog and not stalled:
                notify("WATCHDOG=1")  # only while frames are being analysed: a stuck pipeline gets restarted
                next_watchdog = now + watchdog
            if self.publisher and now >= next_stats:
                self.publisher.publish_now(self.topics.stats, json.dumps(self.stats()).encode(), qos=BY_NAME["stats"].qos)
                next_stats = now + self.config.mqtt.stats_interval_s
            time.sleep(0.1)
        notify("STOPPING=1")
        self.stop_event.set()
        threads[1].join(timeout=30)  # the frame in hand is finished and stored
        # The capture thread too: left running, it can be inside OpenCV's decoder (or a camera's) while Python
        # exits, and native code torn down under a thread aborts the process ("terminate called without an
        # active exception", exit -6 seen once in the browser test) instead of a clean exit 0 for systemd.
        threads[0].join(timeout=10)
        if self.web:
            self.web.stop()  # before the last delivery: labels given until now go with it
        with self.lock:
            summary = self._close_sample()
            outside = self.tally.frames
        undelivered = 0
        if self.publisher:
            if self.publisher.fatal:
                self.publisher.stop(offline=False)
                raise UserError(self.publisher.fatal)
            if not failed and not self.publisher.wait_drained(timeout=self.config.mqtt.stop_timeout_s):
                undelivered = self.outbox.count(self.topics.results)
                log.warning("%d message(s) not acknowledged within mqtt.stop_timeout_s=%g stay in the outbox for the next start",
                            len(self.outbox), self.config.mqtt.stop_timeout_s)
            self.publisher.publish_now(self.topics.stats, json.dumps(self.stats()).encode(), qos=BY_NAME["stats"].qos)
            self.publisher.stop()
        self.outbox.close()
        if summary is not None:
            fraction = summary["blast_fraction"]
            log.info("sample %s: %d frames, %d cells, %d flagged as ALL blasts (%s)", summary["sample_id"], summary["frames"],
                     summary["cells"], summary["blasts"], "n/a" if fraction is None else f"{fraction:.1%}")
        elif outside:
            log.info("no sample open: %d frame(s) analysed outside a sample (results with sample_id null, no summary)", outside)
        if undelivered and self.finite_source:
            # A replay that ends is a job, not a service: "done" must mean delivered, so say what is not.
            log.error("%d result(s) were not delivered to %s:%d and remain in the outbox %s; they are sent at the next "
                      "start with this outbox (check that the broker runs: mosquitto_sub -h %s -p %d -t '#' -v)",
                      undelivered, self.config.mqtt.host, self.config.mqtt.port, self.config.outbox.path,
                      self.config.mqtt.host, self.config.mqtt.port)
            return 1
        return 1 if failed else 0

    @property
    def finite_source(self) -> bool:
        """A folder replayed once (``loop = false``): its run ends by itself."""
        return self.config.source.type == "folder" and not self.config.source.loop


#: glibc's ``M_ARENA_MAX`` and ``M_MMAP_THRESHOLD`` (malloc.h).
_M_ARENA_MAX, _M_MMAP_THRESHOLD = -8, -3
#: Allocations from this size on are mapped on their own and handed back to the system when freed.
FRAME_SIZED_BYTES = 4 << 20


def _frame_friendly_malloc() -> None:
    """How glibc keeps freed frames, set before the agent's threads start. A no-op where the C library has no
    ``mallopt``.

    - Two heaps for the agent's threads: glibc gives each allocating thread a heap of its own (up to 8 per core),
      and frame-sized buffers freed in one stay in its RSS. Peak RSS of `edge run` at 10 frames/s of 1080p
      138.5-144.6 MB instead of 149.9-150.9, frames/s unchanged (``benchmarks/bench_agent.py``; alternated).
    - Buffers of 4 MiB and more (a 1080p RGB frame is 6.2 MB) mapped on their own. By default glibc raises that
      threshold as such buffers are freed, and from then on keeps them in its heaps: peak RSS 128.0-135.0 MB
      instead of 143.5-153.6, frames/s through the agent within the VM's noise (medians 99.1 and 99.6 of 8
      alternated runs). A 1 MiB threshold cost ~8% of the frame rate."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(_M_ARENA_MAX, 2)
        mallopt(_M_MMAP_THRESHOLD, FRAME_SIZED_BYTES)
    except (OSError, AttributeError):
        pass


def run(config_path: Path) -> int:
    _frame_friendly_malloc()  # before the agent starts its threads
    return Agent(load_config(config_path)).run()
