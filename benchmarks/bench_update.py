"""Model update over MQTT: a ~1 MB signed bundle from `quantize publish` to a running `edge run`, and back.

    python benchmarks/bench_update.py [--size-mb 1.0] [--repeats 3]

The bundle is models/default with its threshold moved (another bundle id) and its self-test grown
to reach ``--size-mb`` (the 8 real crops plus random ones, all scored by the bundle itself, so the
device's self-test passes and scores every one). A real mosquitto on loopback and a real agent
replaying samples/frames. Measured from the workstation's side: publish -> the device's answer
that the bundle is active (signature, chunks, staging, self-test, switch), and revert -> answer.
Printed as one JSON object. Targets (issue 13): < 10 s to active, rollback < 5 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge.bundle import MANIFEST, load_bundle, record_self_test, write_manifest  # noqa: E402
from edge.classifier import Classifier  # noqa: E402
from quantize import publish as P  # noqa: E402
from quantize.publish import tolerance_for  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.test_service import Agent, wait_for, write_config  # noqa: E402


def big_bundle(folder: Path, size_mb: float) -> Path:
    root = folder / "bundle"
    shutil.copytree(ROOT / "models" / "default", root)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["threshold"] = round(manifest["threshold"] - 0.01, 6)
    write_manifest(root, manifest)
    classifier = Classifier(root, num_threads=2)
    with np.load(root / manifest["selftest"]["file"]) as archive:
        real = archive["crops"]
    have = sum((root / name).stat().st_size for name in json.loads((root / MANIFEST).read_text())["files"])
    extra = max(0, int((size_mb * 1e6 - have) // real[0].nbytes) + 1)  # random crops do not compress
    crops = np.concatenate([real, np.random.default_rng(0).integers(0, 256, (extra, *real.shape[1:]), dtype=np.uint8)])
    record_self_test(root, crops, classifier.scores(crops), tolerance_for(manifest))  # every crop kept: the size
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="leukoscope-update-"))
    broker = Broker(folder / "broker").start()
    P.keygen(folder / "key.pem")
    key = P.load_key(folder / "key.pem")
    bundle = big_bundle(folder, args.size_mb)
    size = sum((bundle / name).stat().st_size for name in [MANIFEST, *load_bundle(bundle).manifest["files"]])
    config = write_config(folder / "pi.toml", port=broker.port, frames=ROOT / "samples" / "frames", outbox=folder / "outbox.sqlite3",
                          fps=4, loop=True, device="pi1",
                          extra=f'[updates]\nenabled = true\npublic_key = "{P.public_key_of(key)}"\nfolder = "{folder / "bundles"}"\n')
    sender = P.Sender("127.0.0.1", broker.port, "leukoscope")
    agent = Agent(config)
    publish_s, revert_s = [], []
    try:
        if not wait_for(lambda: sender.statuses.get("pi1") == b"online", 60):
            sys.exit(f"bench_update: the agent did not come online:\n{agent.log()}")
        for _ in range(args.repeats):
            started = time.monotonic()
            signed = P.sign_bundle(bundle, key)
            [outcome] = P.publish(sender, signed, ["pi1"])
            publish_s.append(time.monotonic() - started)
            if not outcome.ok:
                sys.exit(f"bench_update: refused: {outcome.reply}")
            started = time.monotonic()
            [back] = P.revert(sender, ["pi1"])
            revert_s.append(time.monotonic() - started)
            if not back.ok:
                sys.exit(f"bench_update: revert refused: {back.reply}")
    finally:
        sender.close()
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"benchmark": "model_update", "bundle_bytes": size, "chunks_of_64KiB": -(-size // P.CHUNK_SIZE),
                      "publish_to_active_s": {"median": round(float(np.median(publish_s)), 3), "max": round(max(publish_s), 3)},
                      "revert_s": {"median": round(float(np.median(revert_s)), 3), "max": round(max(revert_s), 3)},
                      "repeats": args.repeats, "machine": {"python": platform.python_version()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
