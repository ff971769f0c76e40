import csv
import logging

import cv2
import numpy as np
import pytest

from trainer.dataset import load_arrays, parse_name, scan
from edge.errors import DataError
from edge.preprocessing import CropContract
from tests.conftest import cell_crop, write_ours

SMALL = CropContract(size=32, um_per_px=0.75)


def test_our_layout(tmp_path):
    write_ours(tmp_path, {"1": 3, "2": 2, "H1": 4})
    samples = scan(tmp_path)
    assert len(samples) == 9
    assert {(s.patient, s.label) for s in samples} == {("1", 1), ("2", 1), ("H1", 0)}


def test_published_cnmc_layout(tmp_path):
    """C-NMC_Leukemia/training_data/fold_*/{all,hem}/*.bmp, plus the preliminary test set's CSV."""
    training = tmp_path / "C-NMC_Leukemia" / "training_data"
    write_ours(training / "fold_0", {"3": 2, "H5": 2}, suffix=".bmp")
    write_ours(training / "fold_1", {"4": 2, "H6": 1}, suffix=".bmp")
    prelim = tmp_path / "C-NMC_Leukemia" / "validation_data"
    (prelim / "C-NMC_test_prelim_phase_data").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = [("UID_57_29_1_all.bmp", "1.bmp", 1), ("UID_H24_7_1_hem.bmp", "2.bmp", 0)]
    for original, new, _ in rows:
        cv2.imwrite(str(prelim / "C-NMC_test_prelim_phase_data" / new), cell_crop(rng))
    with (prelim / "C-NMC_test_prelim_phase_data_labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Patient_ID", "new_names", "labels"])
        writer.writerows(rows)
    samples = scan(tmp_path)
    assert len(samples) == 9
    assert {s.patient for s in samples} == {"3", "4", "H5", "H6", "57", "H24"}
    by_name = {s.path.name: s for s in samples}
    assert by_name["1.bmp"].label == 1 and by_name["1.bmp"].patient == "57"
    assert by_name["2.bmp"].label == 0


@pytest.mark.parametrize("stem, expected", [
    ("UID_11_10_1_all", ("11", "all")),
    ("uid_h10_100_1_HEM", ("H10", "hem")),
    ("UID_11_5_4_all (1)", ("11", "all")),  # a duplicate as named in the published download
])
def test_patient_from_name(stem, expected):
    assert parse_name(stem) == expected


def test_label_conflict_is_an_error(tmp_path):
    write_ours(tmp_path, {"1": 2, "H1": 2})
    (tmp_path / "hem" / "UID_H1_0_1_hem.png").rename(tmp_path / "all" / "UID_H1_0_1_hem.png")
    with pytest.raises(DataError, match="label conflict.*move the file"):
        scan(tmp_path)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: (root / "all").mkdir(parents=True), "no images found"),
    (lambda root: write_ours(root, {"1": 3}), "only 'all' images"),
    (lambda root: write_ours(root, {"1": 1, "H1": 1}) and (root / "all" / "cell.png").write_bytes(b"x"), "C-NMC pattern"),
])
def test_bad_folders(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        scan(root)


def test_a_few_unreadable_images_are_named_not_silently_skipped(tmp_path, caplog):
    write_ours(tmp_path, {"1": 60, "H1": 60})
    (tmp_path / "all" / "UID_1_0_1_all.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        images, kept = load_arrays(scan(tmp_path), SMALL, progress=False)
    assert images.shape == (119, 32, 32, 3) and len(kept) == 119
    assert "1 unreadable" in caplog.text and "UID_1_0_1_all.png" in caplog.text


def test_many_unreadable_images_are_an_error(tmp_path):
    write_ours(tmp_path, {"1": 4, "H1": 4})
    for path in list((tmp_path / "all").iterdir())[:3]:
        path.write_bytes(b"")
    with pytest.raises(DataError, match="3 of 8 images are unreadable"):
        load_arrays(scan(tmp_path), SMALL, progress=False)
