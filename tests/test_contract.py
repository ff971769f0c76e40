"""The µm crop contract and the multi-source loader: scale, colour, sources, bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from trainer.dataset import SCALE_FILE, load_arrays, parse_source, scan_sources
from edge.errors import BundleError, DataError, UserError
from edge.preprocessing import DEFAULT_CONTRACT, CropContract, crop_cell, normalise_colour, read_rgb
from edge.segmentation import find_cells
from tests.conftest import CNMC, PBC, cell_crop, needs_cnmc, needs_pbc, write_ours

SMALL = CropContract(size=32, um_per_px=0.75)


def _cell(image: np.ndarray):
    (cell,) = find_cells(image)
    return cell


def _real_cell() -> np.ndarray:
    if CNMC.is_dir():
        return read_rgb(sorted((CNMC / "all").glob("*.png"))[0])
    return cell_crop(np.random.default_rng(0), size=400, blast=True)[..., ::-1].copy()


def test_twice_the_pixels_at_half_the_scale_gives_the_same_model_input():
    image = _real_cell()
    cell = _cell(image)
    reference = crop_cell(image, cell.mask, cell.bbox, 0.06)
    doubled = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    cell2 = _cell(doubled)
    again = crop_cell(doubled, cell2.mask, cell2.bbox, 0.03)
    assert again.shape == reference.shape == (DEFAULT_CONTRACT.size, DEFAULT_CONTRACT.size, 3)
    inside = (reference.max(axis=2) > 0) & (again.max(axis=2) > 0)
    # Same cell, same size in the model's pixels: the masks overlap almost entirely...
    union = (reference.max(axis=2) > 0) | (again.max(axis=2) > 0)
    assert inside.sum() / union.sum() > 0.9
    # ...and the pixels agree within resampling error.
    difference = np.abs(reference.astype(int) - again.astype(int))[inside]
    assert np.median(difference) <= 4


def test_the_model_sees_cell_size_in_micrometres_not_pixels():
    image = _real_cell()
    cell = _cell(image)
    at_fine = crop_cell(image, cell.mask, cell.bbox, 0.03)
    at_coarse = crop_cell(image, cell.mask, cell.bbox, 0.06)  # same pixels, twice the µm: a cell twice as wide
    width = lambda crop: int(np.any(crop.max(axis=2) > 0, axis=0).sum())  # noqa: E731
    assert 1.7 < width(at_coarse) / width(at_fine) < 2.3


def test_colour_normalisation_removes_a_lab_cast():
    image = _real_cell()
    cell = _cell(image)
    x, y, w, h = cell.bbox
    patch = image[y:y + h, x:x + w]
    cast = np.clip(patch.astype(np.float32) * [1.15, 0.95, 0.85] + 10, 0, 255).astype(np.uint8)
    a = normalise_colour(patch, cell.mask, DEFAULT_CONTRACT).astype(int)
    b = normalise_colour(cast, cell.mask, DEFAULT_CONTRACT).astype(int)
    raw_difference = np.abs(patch.astype(int) - cast.astype(int))[cell.mask].mean()
    assert np.abs(a - b)[cell.mask].mean() < raw_difference / 3
    assert (a[~cell.mask] == 0).all() and (a[cell.mask].max(axis=1) > 0).all()  # background black, cell never


def test_contract_round_trips_through_the_manifest():
    record = DEFAULT_CONTRACT.to_manifest()
    assert CropContract.from_manifest(json.loads(json.dumps(record)), "m") == DEFAULT_CONTRACT


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(name="some-other-v9"), "expects preprocessing 'some-other-v9'"),
    (lambda r: r["params"].pop("um_per_px"), "must give size, um_per_px"),
    (lambda r: r["params"].update(um_per_px=9.0), "out of range"),
])
def test_a_contract_this_code_does_not_make_is_refused(change, message):
    record = json.loads(json.dumps(DEFAULT_CONTRACT.to_manifest()))
    change(record)
    with pytest.raises(BundleError, match=message) as caught:
        CropContract.from_manifest(record, "manifest.json")
    assert "\n" not in str(caught.value)


def _types_layout(root, sizes=(120,), seed=0):
    rng = np.random.default_rng(seed)
    for kind in ("lymphocyte", "monocyte"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(sizes * 3):
            cv2.imwrite(str(root / kind / f"{kind[:2]}_{i}.jpg"), cell_crop(rng, size=size))
    return root


def test_several_sources_each_with_its_scale(tmp_path):
    cnmc = write_ours(tmp_path / "cnmc", {"1": 3, "H1": 2})
    types = _types_layout(tmp_path / "pbc")
    (types / SCALE_FILE).write_text(json.dumps({"um_per_px": 0.11}))
    samples, record = scan_sources([str(cnmc), f"{tmp_path / 'pbc'}"])
    assert record["cnmc"]["scale_from"] == "C-NMC reference" and record["pbc"]["um_per_px"] == 0.11
    assert {s.cell_type for s in samples if s.source == "pbc"} == {"lymphocyte", "monocyte"}
    assert all(s.label == 0 for s in samples if s.source == "pbc")
    given, _ = scan_sources([str(cnmc), f"{types}=0.2"])
    assert {s.um_per_px for s in given if s.source == "pbc"} == {0.2}
    images, kept = load_arrays(samples, SMALL, progress=False)
    assert images.shape == (len(kept), 32, 32, 3)


def test_a_source_without_a_scale_is_an_error(tmp_path):
    write_ours(tmp_path / "cnmc", {"1": 2})
    _types_layout(tmp_path / "plain")  # drawn cells on black: no red cells to measure
    with pytest.raises(DataError, match="has no scale.*=UM_PER_PX"):
        scan_sources([str(tmp_path / "cnmc"), str(tmp_path / "plain")])


@pytest.mark.parametrize("value", ["0", "-0.1", "7.5"])
def test_absurd_scales_are_refused(tmp_path, value):
    write_ours(tmp_path / "cnmc", {"1": 2, "H1": 2})
    with pytest.raises(UserError, match="outside 0.01-5.0"):
        scan_sources([f"{tmp_path / 'cnmc'}={value}"])


def test_a_scale_that_is_not_a_number_is_named():
    with pytest.raises(DataError, match="must be the source's µm per pixel"):
        parse_source("data/pbc=fast")


def test_mixed_image_sizes_in_one_source_are_refused(tmp_path):
    write_ours(tmp_path / "cnmc", {"1": 2})
    types = _types_layout(tmp_path / "pbc", sizes=(100, 300))
    samples, _ = scan_sources([str(tmp_path / "cnmc"), f"{types}=0.1"])
    with pytest.raises(DataError, match="mixes image sizes"):
        load_arrays(samples, SMALL, progress=False)


@needs_pbc
def test_real_pbc_cells_are_measured_and_cropped(tmp_path):
    samples, record = scan_sources([str(PBC)], require_both=False)
    assert 0.09 < record[PBC.name]["um_per_px"] < 0.13, record  # red cells ~7.5 µm
    lymphocytes = [s for s in samples if s.cell_type == "lymphocyte"][:20]
    images, kept = load_arrays(lymphocytes, DEFAULT_CONTRACT, progress=False)
    assert len(kept) >= 19
    diameters = [2 * np.sqrt((crop.max(axis=2) > 0).sum() / np.pi) * DEFAULT_CONTRACT.um_per_px for crop in images]
    assert 7 < np.median(diameters) < 14  # a lymphocyte, in micrometres


@needs_cnmc
def test_cnmc_normal_cells_are_lymphocyte_sized_at_the_reference_scale():
    samples, _ = scan_sources([str(CNMC)])
    hem = [s for s in samples if s.label == 0][:20]
    images, _ = load_arrays(hem, DEFAULT_CONTRACT, progress=False)
    diameters = [2 * np.sqrt((crop.max(axis=2) > 0).sum() / np.pi) * DEFAULT_CONTRACT.um_per_px for crop in images]
    assert 7 < np.median(diameters) < 14
