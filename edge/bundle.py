"""The model bundle: the contract between the workstation that exports a model and the device.

A bundle is a folder holding ``manifest.json`` and the model file(s) it lists. The device
trusts nothing it cannot verify: the format version, the SHA-256 of every file, and (once
an interpreter is open) that the tensors agree with what the manifest declares. Any
mismatch is refused with one line naming the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, TypedDict

from edge.errors import BundleError
from edge.preprocessing import COLOR_ORDER, CropContract
from edge.splitter import CONTRACTS as SPLITTER_CONTRACTS

MANIFEST = "manifest.json"
FORMAT = "leukoscope-model-bundle"
FORMAT_VERSION = 1
#: The classes, index = class id: C-NMC's folder names, kept in JSON; people read ``edge.LABEL_WORDS``.
LABELS = ("hem", "all")
POSITIVE_LABEL = "all"  # an ALL (leukemic) blast: the class a model's single output scores


class Tensor(TypedDict, total=False):
    """An input or output tensor as the exporter saw it in the int8 model; checked on the device's interpreter."""

    dtype: str
    shape: list[int]
    quantization: dict[str, float]
    size: int  # input: side of the square crop
    color_order: str  # input
    meaning: str  # output


class Manifest(TypedDict, total=False):
    """``manifest.json``, the one definition of what a bundle declares: ``new_manifest`` writes it (at
    export), ``check_manifest`` and ``Bundle`` read it (on the device). ``files``, ``format`` and
    ``format_version`` are filled in by ``write_manifest``; ``metrics`` and ``selftest`` are added after
    the parity check and the self-test recording."""

    format: str
    format_version: int
    labels: list[str]
    positive_label: str
    input: Tensor
    output: Tensor
    preprocessing: dict[str, Any]  # ``CropContract.to_manifest()``
    threshold: float
    threshold_rule: str
    models: dict[str, str]  # variant ("cpu", "edgetpu") -> file name
    files: dict[str, str]  # file name -> SHA-256
    edgetpu: dict[str, Any]
    provenance: dict[str, Any]
    metrics: dict[str, Any]
    selftest: dict[str, Any]
    splitter: dict[str, Any]  # optional: {"file", "contract", "um_per_px", ...}, added by ``quantize splitter``


REQUIRED_KEYS = ("labels", "positive_label", "input", "output", "preprocessing", "threshold", "models", "files")


def new_manifest(*, input_tensor: Tensor, output_tensor: Tensor, contract: CropContract, threshold: float,
                 threshold_rule: str, models: dict[str, str], edgetpu: dict[str, Any],
                 provenance: dict[str, Any]) -> Manifest:
    """The manifest of a new bundle, before ``write_manifest`` adds the checksums: the classes, the
    colour order and the crop contract are this leukoscope's, so a bundle always states what it was made for."""
    return Manifest(
        labels=list(LABELS), positive_label=POSITIVE_LABEL,
        input=Tensor(**input_tensor, size=contract.size, color_order=COLOR_ORDER),
        output=Tensor(**output_tensor, meaning=f"P({POSITIVE_LABEL})"),
        preprocessing=contract.to_manifest(), threshold=float(threshold), threshold_rule=threshold_rule,
        models=dict(models), edgetpu=dict(edgetpu), provenance=dict(provenance),
    )


#: Crops (N x S x S x 3 uint8, array ``crops`` of a compressed ``.npz``) that a device scores before it switches to a
#: bundle it was sent: the scores must match ``manifest["selftest"]["scores"]`` within its tolerance.
SELFTEST_FILE = "selftest_crops.npz"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: the folder and its manifest, every file checked."""

    root: Path
    manifest: Manifest = field(repr=False)

    @cached_property
    def id(self) -> str:
        """Short name of exactly this bundle: the manifest names every file's SHA-256, so its own
        hash names the whole bundle (what a device reports as its active bundle)."""
        return bundle_id(self.root / MANIFEST)

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def contract(self) -> CropContract:
        """The crop contract the model was trained on (checked by ``load_bundle``)."""
        return CropContract.from_manifest(self.manifest["preprocessing"], str(self.root / MANIFEST))

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def positive_label(self) -> str:
        return str(self.manifest["positive_label"])

    @property
    def splitter(self) -> tuple[Path, float, str] | None:
        """The cell splitter's model file, the µm per pixel it sees frames at and its contract; None when
        the bundle has none."""
        record = self.manifest.get("splitter")
        return (self.root / record["file"], float(record["um_per_px"]), record["contract"]) if record else None

    def model_path(self, variant: str = "cpu") -> Path:
        models = self.manifest["models"]
        if variant not in models:
            have = ", ".join(sorted(models)) or "none"
            hint = " (export with `quantize export --edgetpu` where edgetpu_compiler is installed)" if variant == "edgetpu" else ""
            raise BundleError(f"bundle {self.root} has no '{variant}' model (it has: {have}){hint}")
        return self.root / models[variant]


def bundle_id(manifest_path: Path) -> str:
    """The first 16 hex digits of the manifest's SHA-256 (see ``Bundle.id``)."""
    return sha256_file(manifest_path)[:16]


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` with the SHA-256 of every file it names (models, self-test crops) filled in."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["format_version"] = FORMAT_VERSION
    names = set(manifest["models"].values())
    for optional in ("selftest", "splitter"):
        if isinstance(manifest.get(optional), dict):
            names.add(manifest[optional]["file"])
    manifest["files"] = {name: sha256_file(root / name) for name in sorted(names)}
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def record_self_test(root: Path, crops: Any, scores: Any, tolerance: float) -> Path:
    """Add self-test crops and the scores this bundle's model gave them to the bundle at ``root``
    (manifest rewritten with their hash): a device that is sent the bundle scores them again and
    refuses to switch if its runtime disagrees."""
    import numpy as np

    crops = np.asarray(crops, dtype=np.uint8)
    with (root / SELFTEST_FILE).open("wb") as handle:
        np.savez_compressed(handle, crops=crops)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["selftest"] = {"file": SELFTEST_FILE, "scores": [round(float(s), 6) for s in scores],
                            "tolerance": float(tolerance)}
    return write_manifest(root, manifest)


def load_bundle(root: str | Path) -> Bundle:
    """Read and verify a bundle folder; ``BundleError`` with one line for anything wrong."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"model bundle {root} does not exist; pass a folder made by `quantize export`")
    if not manifest_path.is_file():
        raise BundleError(f"model bundle {root} has no {MANIFEST}; re-export it with `quantize export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON ({error}); re-export the bundle") from None
    check_manifest(manifest, manifest_path)
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"model bundle {root} is missing {name}; copy the whole bundle folder again")
        if sha256_file(path) != expected:
            raise BundleError(
                f"{path} does not match its SHA-256 in {MANIFEST} (corrupt or modified); copy the bundle again"
            )
    return Bundle(root=root, manifest=manifest)


def check_manifest(manifest: Any, manifest_path: Path | str) -> None:
    """Everything about a manifest that this leukoscope can check without its files: format, labels,
    crop contract, colour order, checksums named. A device checks a bundle it is sent with this
    before the first byte of the model arrives."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a leukoscope model bundle manifest; re-export the bundle")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has bundle format version {version!r}; this leukoscope reads version "
            f"{FORMAT_VERSION}: upgrade leukoscope or re-export the bundle"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks {', '.join(missing)}; re-export the bundle")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["models"], dict) or not isinstance(manifest["input"], dict):
        raise BundleError(f"{manifest_path}: files, models and input must be JSON objects; re-export the bundle")
    if manifest["positive_label"] not in manifest["labels"]:
        raise BundleError(f"{manifest_path}: positive_label is not one of labels; re-export the bundle")
    contract = CropContract.from_manifest(manifest["preprocessing"], str(manifest_path))
    colour = manifest["input"].get("color_order") if isinstance(manifest["input"], dict) else None
    if colour != COLOR_ORDER:
        raise BundleError(f"{manifest_path}: the model expects colour order {colour!r}, this leukoscope feeds "
                          f"{COLOR_ORDER!r}; re-export the bundle")
    if manifest["input"].get("size") != contract.size:
        raise BundleError(f"{manifest_path}: input size {manifest['input'].get('size')} disagrees with the "
                          f"preprocessing size {contract.size}; re-export the bundle")
    for name in manifest["models"].values():
        if name not in manifest["files"]:
            raise BundleError(f"{manifest_path}: model file {name} has no checksum; re-export the bundle")
    selftest = manifest.get("selftest")
    if selftest is not None and not (isinstance(selftest, dict) and selftest.get("file") in manifest["files"]
                                     and isinstance(selftest.get("scores"), list)
                                     and isinstance(selftest.get("tolerance"), (int, float))):
        raise BundleError(f"{manifest_path}: selftest must name a checksummed file, its scores and a tolerance; re-export the bundle")
    _check_splitter(manifest.get("splitter"), manifest["files"], manifest_path)
    for name in manifest["files"]:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{manifest_path}: file name {name!r} points outside the bundle; re-export it")


def _check_splitter(record: Any, files: dict, manifest_path: Path | str) -> None:
    """A splitter entry must name a checksummed file, a contract this leukoscope implements and its scale."""
    if record is None:
        return
    if not isinstance(record, dict) or record.get("file") not in files:
        raise BundleError(f"{manifest_path}: splitter must name a checksummed file; re-add it with `quantize splitter`")
    if record.get("contract") not in SPLITTER_CONTRACTS:
        raise BundleError(f"{manifest_path}: splitter contract {record.get('contract')!r} is not one this leukoscope "
                          f"implements ({', '.join(SPLITTER_CONTRACTS)}); upgrade leukoscope or re-add it with `quantize splitter`")
    scale = record.get("um_per_px")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < 10:
        raise BundleError(f"{manifest_path}: splitter um_per_px {scale!r} is not a scale in µm per pixel; "
                          "re-add it with `quantize splitter`")


def check_tensors(bundle: Bundle, inputs: list[dict], outputs: list[dict]) -> None:
    """Refuse a model whose tensors disagree with the manifest (interpreter details as given)."""
    declared_in, declared_out = bundle.manifest["input"], bundle.manifest["output"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"bundle {bundle.root}: model has {len(inputs)} inputs and {len(outputs)} outputs; expected 1 and 1")
    shape = [int(d) for d in inputs[0]["shape"]]
    size = bundle.input_size
    if shape[1:] != [size, size, 3]:
        raise BundleError(f"bundle {bundle.root}: model input shape {shape} disagrees with manifest size {size}x{size}x3")
    for role, detail, declared in (("input", inputs[0], declared_in), ("output", outputs[0], declared_out)):
        dtype = getattr(detail["dtype"], "__name__", str(detail["dtype"]))
        if dtype != declared["dtype"]:
            raise BundleError(f"bundle {bundle.root}: model {role} is {dtype} but the manifest says {declared['dtype']}")
        quant = declared.get("quantization")
        if quant:
            scale, zero_point = detail.get("quantization", (0.0, 0))
            if abs(scale - quant["scale"]) > 1e-6 * max(1.0, abs(quant["scale"])) or zero_point != quant["zero_point"]:
                raise BundleError(
                    f"bundle {bundle.root}: model {role} quantization ({scale}, {zero_point}) disagrees with the manifest"
                )
