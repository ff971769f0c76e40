from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from trainer.dataset import Sample
from edge.errors import DataError
from trainer.split import assert_disjoint, grouped_folds, patient_split


def make_samples(all_sizes: list[int], hem_sizes: list[int]) -> list[Sample]:
    samples = []
    for number, size in enumerate(all_sizes):
        samples += [Sample(Path(f"UID_{number}_{i}_1_all.png"), 1, str(number)) for i in range(size)]
    for number, size in enumerate(hem_sizes):
        samples += [Sample(Path(f"UID_H{number}_{i}_1_hem.png"), 0, f"H{number}") for i in range(size)]
    return samples


patients = st.lists(st.integers(1, 40), min_size=6, max_size=30)


@settings(max_examples=60, deadline=None)
@given(all_sizes=patients, hem_sizes=patients, seed=st.integers(0, 10_000))
def test_no_patient_in_two_splits(all_sizes, hem_sizes, seed):
    samples = make_samples(all_sizes, hem_sizes)
    split = patient_split(samples, val_fraction=0.2, test_fraction=0.2, seed=seed)
    sides = [{samples[i].patient for i in part} for part in (split.train, split.validation, split.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sorted(split.train + split.validation + split.test) == list(range(len(samples)))
    for part in (split.train, split.validation, split.test):
        assert {samples[i].label for i in part} == {0, 1}


@settings(max_examples=30, deadline=None)
@given(all_sizes=patients, hem_sizes=patients, seed=st.integers(0, 10_000))
def test_grouped_folds_leave_whole_patients_out(all_sizes, hem_sizes, seed):
    samples = make_samples(all_sizes, hem_sizes)
    folds = grouped_folds(samples, folds=3, val_fraction=0.25, seed=seed)
    tested = sorted(i for fold in folds for i in fold.test)
    assert tested == list(range(len(samples)))  # every cell scored exactly once, by a model that never saw its patient
    for fold in folds:
        assert_disjoint(samples, fold.train, fold.validation, fold.test)


def test_split_is_reproducible_from_seed():
    samples = make_samples([5, 8, 3, 9, 4, 7, 5, 6, 2, 8, 3, 5], [6, 2, 9, 4, 5, 3, 4, 4, 7, 2, 3, 6])
    assert patient_split(samples, seed=3) == patient_split(samples, seed=3)
    assert any(patient_split(samples, seed=3) != patient_split(samples, seed=s) for s in range(4, 10))


def test_assert_disjoint_catches_overlap():
    samples = make_samples([2, 2], [2, 2])
    with pytest.raises(AssertionError, match="patient 0 appears in two splits"):
        assert_disjoint(samples, [0], [1])


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(DataError, match="at least 2 patients"):
        patient_split(make_samples([10], [3, 4]))


def test_loss_shares_keep_each_side_and_source_and_temper_large_donors():
    """``balanced_weights``: ALL and normal carry half each, sources and cell types share alike, and
    ``patient_power`` moves weight from a donor of many cells to donors of few without changing that."""
    import numpy as np

    from trainer.fit import balanced_weights

    samples = make_samples([5, 5], [40, 2, 2]) + [
        Sample(Path(f"LY_{i}.jpg"), 0, f"pbc:{i}", "pbc", "lymphocyte") for i in range(6)] + [
        Sample(Path(f"MO_{i}.jpg"), 0, f"pbc:{i + 6}", "pbc", "monocyte") for i in range(2)]
    hem = {p: [i for i, s in enumerate(samples) if s.patient == p] for p in ("H0", "H1", "H2")}
    shares = {}
    for power in (1.0, 0.5, 0.0):
        w = balanced_weights(samples, power)
        w = w / w.sum()
        side = {label: w[[i for i, s in enumerate(samples) if s.label == label]].sum() for label in (0, 1)}
        assert side[0] == pytest.approx(0.5) and side[1] == pytest.approx(0.5)
        by_source = {src: w[[i for i, s in enumerate(samples) if s.label == 0 and s.source == src]].sum() for src in ("cnmc", "pbc")}
        assert by_source["cnmc"] == pytest.approx(0.25) and by_source["pbc"] == pytest.approx(0.25)
        assert w[[i for i, s in enumerate(samples) if s.cell_type == "monocyte"]].sum() == pytest.approx(0.125)
        shares[power] = {p: float(w[ks].sum()) / 0.25 for p, ks in hem.items()}
        # Within a patient every cell weighs the same.
        assert np.allclose(w[hem["H0"]], w[hem["H0"][0]])
    assert shares[1.0]["H0"] == pytest.approx(40 / 44)  # by cell
    assert shares[0.0]["H0"] == pytest.approx(1 / 3)  # by patient
    assert shares[1.0]["H0"] > shares[0.5]["H0"] > shares[0.0]["H0"]
