"""``edge check``: the self-test of a device before it is trusted, one line per check.

Kept apart from the agent: it borrows the agent's parts (config, bundle, source, broker client)
but runs none of its threads.
"""

from __future__ import annotations

import os
import threading
from itertools import islice
from pathlib import Path

import numpy as np

from edge.agent import open_frames
from edge.classifier import Classifier
from edge.config import AgentConfig, load_config
from edge.errors import UserError
from edge.sources import Frame

#: Frames of the source the configured scale is checked on (their red cells' median).
SCALE_CHECK_FRAMES = 3


def check(config_path: Path) -> int:
    """Self-test; one line per failure, exit status 1 if any."""
    failures: list[str] = []
    try:
        config = load_config(config_path)
    except UserError as error:
        print(f"FAIL config: {error}")
        return 1
    print(f"ok   config {config_path}")
    classifier = _check_bundle(config, failures)
    stop = threading.Event()
    frame = None
    frames: list[Frame] = []
    try:
        frames = [f for f in islice(open_frames(config, stop.is_set, lambda reason: (failures.append(f"camera: {reason}"), stop.set())),
                                    SCALE_CHECK_FRAMES) if f is not None and f.image is not None]
        frame = frames[0] if frames else None
        if frame is not None:
            print(f"ok   source {config.source.type}: {frame.image.shape[1]}x{frame.image.shape[0]} frame")
        elif not any(f.startswith("camera") for f in failures):
            failures.append(f"camera: source {config.source.type} delivered no readable frame")
    except UserError as error:
        failures.append(f"camera: {error}")
    if frames:
        try:
            print(_check_light(frames, config.segmentation.detect_width))
        except UserError as error:
            failures.append(f"camera: {error}")
    if frames and config.segmentation.um_per_px is not None:
        try:
            print(f"ok   scale {_check_scale(config.segmentation.um_per_px, frames)}")
        except UserError as error:
            failures.append(f"scale: {error}")
    if classifier is not None and config.segmentation.um_per_px is not None:
        from edge.calibration import coarse_scale

        if coarse := coarse_scale(config.segmentation.um_per_px, classifier.bundle.contract.um_per_px):
            print(f"note scale: {coarse}")
    if config.pipeline.processes and classifier is not None:
        try:
            print(f"ok   worker processes {_check_workers(config, classifier, frame)}")
        except UserError as error:
            failures.append(f"worker processes: {error}")
    if config.mqtt.enabled:
        failures.extend(_check_broker(config))
    try:
        print(f"ok   outbox {config.outbox.path} ({_check_outbox(config.outbox.path)})")
    except UserError as error:
        failures.append(f"outbox: {error}")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


def _check_light(frames: list[Frame], detect_width: int) -> str:
    """The source's first frames lit, not washed out, and in colour. Frames without colour fail: a monochrome camera
    or a greyscale format never shows the stain nuclei are found by. Dark or overexposed frames are a note, not a
    failure: this check is the service's ExecStartPre, and a lamp off or turned up at boot must not keep the service
    from starting."""
    from edge.gate import look_at

    looks = [look_at(f.image) for f in frames]  # type: ignore[arg-type]  # readable frames only
    fine = [look for look in looks if look.problem is None]
    if fine:
        return f"ok   light: {fine[0].measured()}{_evenness(frames[looks.index(fine[0])].image, detect_width)}"  # type: ignore[arg-type]
    if all(look.problem == "no_colour" for look in looks):
        raise UserError(looks[0].warning(f"the first of {len(looks)},"))
    shown = next(i for i, look in enumerate(looks) if look.problem != "no_colour")
    return f"note light: {looks[shown].warning(f'frame {shown + 1} of {len(looks)},')}"


def _evenness(image: np.ndarray, detect_width: int) -> str:
    """How unevenly the lamp lights the frame, where it does (``segmentation.illumination``, on the detection copy's
    size): cells are still found, but an engineer aligning the microscope wants to know."""
    from edge.segmentation import detection_copy, illumination

    gain = illumination(detection_copy(image, detect_width)[0])
    if gain is None:
        return ""
    return (f"; uneven across the frame (dimmest {1 / float(gain.max()):.0%} of the brightest): evened out before cells "
            "are looked for, but centring the lamp and condenser (Koehler) gives an even field")


def _check_scale(configured: float, frames: list[Frame]) -> str:
    """The configured scale against the red cells of the source's first frames: a wrong objective or binning (2x
    or more off) fails, since every size and crop would then be wrong; a smaller difference is said, as the
    agent's scale watch will."""
    from edge.calibration import DRIFT_WARNING, calibrate, drift, off_by_factor

    measured = calibrate([f.image for f in frames]).um_per_px
    if measured is None:
        return f"{configured} µm per pixel configured (too few red cells in {len(frames)} frame(s) to check it)"
    if off_by_factor(measured, configured):
        raise UserError(f"the source's red cells measure {measured:.4f} µm per pixel, {measured / configured:.2f}x the "
                        f"configured segmentation.um_per_px = {configured}; was the objective or binning changed? "
                        "run `edge calibrate --source CONFIG.toml` and set the value it prints")
    note = "; `edge calibrate` would refine it" if drift(measured, configured) > DRIFT_WARNING else ""
    return f"{configured} µm per pixel configured, the source's red cells measure {measured:.4f}{note}"


def _check_workers(config: AgentConfig, classifier: Classifier, frame: Frame | None) -> str:
    """With ``pipeline.processes``: the workers start where the agent will run (the fork server, shared memory
    and the bundle in each, inside the service's sandbox when run as its ExecStartPre) and analyse a frame (the
    source's, or a blank one). The configured scale, or any plausible one: the check is of the machinery."""
    from dataclasses import replace

    from edge.pipeline import Pipeline
    from edge.workers import AnalysisProcesses

    settings = config.segmentation.settings()
    pipeline = Pipeline(classifier, replace(settings, um_per_px=settings.um_per_px or 0.1))
    image = frame.image if frame is not None else np.full((64, 64, 3), 230, np.uint8)
    with AnalysisProcesses(pipeline, config.pipeline.workers) as analysers:
        for _ in range(config.pipeline.workers):  # every worker: a frame each (they take turns)
            cells = len(analysers.analyse(Frame(image, "edge check")).found)
    return f"{config.pipeline.workers} started, each analysed a frame ({cells} cells)"


def _check_bundle(config: AgentConfig, failures: list[str]) -> Classifier | None:
    """Open the bundle the agent will score with: with updates enabled, the updater's active one (a bundle
    sent by `quantize publish`), which may differ from classifier.bundle in the config. None (and a failure
    noted) when it cannot be opened."""
    bundle, note = config.classifier.bundle, ""
    if config.updates.enabled:
        from edge.updates import bundle_in_use

        bundle, previous = bundle_in_use(config.updates, config.classifier.bundle)
        if bundle.resolve() != config.classifier.bundle.resolve():
            note = f", the updater's active bundle; classifier.bundle {config.classifier.bundle} is the factory one"
    try:
        classifier = Classifier(bundle, num_threads=config.interpreter_threads,
                                edgetpu=config.classifier.edgetpu, cpu_fallback=config.classifier.cpu_fallback)
    except UserError as error:
        if note:
            fallback = previous or config.classifier.bundle
            failures.append(f"model: the updater's active bundle {bundle}: {error}; the agent would roll back to {fallback} "
                            "at start (or send a good bundle with `quantize publish`)")
        else:
            failures.append(f"model: {error}")
        return None
    print(f"ok   model bundle {bundle} {classifier.bundle.id} ({'Edge TPU' if classifier.edgetpu else 'CPU'}{note})")
    return classifier


def _check_outbox(path: Path) -> str:
    """Whether the agent will be able to keep its outbox at ``path``, without creating it: a self-test
    must leave nothing behind (an empty outbox made by root would even lock the service out of it)."""
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            raise UserError(f"{path} is not a file this user can read and write; check outbox.path and its owner")
        with path.open("rb") as handle:
            if path.stat().st_size and handle.read(16) != b"SQLite format 3\x00":
                raise UserError(f"{path} is not an SQLite database; point outbox.path at a new file")
        return f"exists, {path.stat().st_size} bytes"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path} cannot be created: {parent} is not writable by this user; check outbox.path "
                        "(StateDirectory= in the unit makes /var/lib/leukoscope)")
    return f"not there yet; the agent creates it in {parent}" if parent == path.parent else \
        f"not there yet; the agent creates it and the folders under {parent}"


def _check_broker(config: AgentConfig) -> list[str]:
    """Connect and disconnect with the device's credentials and TLS: no will, no status, no subscription,
    so nothing is left on the broker (a retained ``online`` would claim an agent that is not running)."""
    from edge.publisher import FATAL_REASONS, mqtt_client

    where = f"{config.mqtt.host}:{config.mqtt.port}"
    try:
        client = mqtt_client(config.mqtt, f"leukoscope-check-{config.device.id}")
    except UserError as error:
        return [f"broker: {error}"]
    answered = threading.Event()
    outcome: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            hint = " (check mqtt.username and the password file)" if str(reason_code) in FATAL_REASONS else ""
            outcome.append(f"broker {where} refused the connection: {reason_code}{hint}")
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(config.mqtt.host, config.mqtt.port, keepalive=10)
    except (OSError, ValueError) as error:
        return [f"broker: cannot reach {where} ({error}); is the broker running and the port open?"]
    client.loop_start()
    try:
        if not answered.wait(5):
            outcome.append(f"no answer from {where} within 5 s")
    finally:
        client.disconnect()
        client.loop_stop()
    if outcome:
        return [f"broker: {outcome[0]}"]
    print(f"ok   broker {where}")
    return []
