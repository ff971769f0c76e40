import numpy as np
import pytest

from trainer.metrics import CollapsedModel, check_not_collapsed, choose_threshold, compute, summarize_folds


def test_metrics_on_a_known_case():
    labels = [1, 1, 1, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.2, 0.6]
    m = compute(labels, scores, 0.5, ["1", "1", "2", "H1", "H1"])
    assert m["confusion"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
    assert m["sensitivity_all"] == pytest.approx(2 / 3) and m["specificity_all"] == pytest.approx(0.5)
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert m["per_patient_accuracy"] == {"1": 1.0, "2": 0.0, "H1": 0.5}


def test_threshold_separates_when_it_can():
    labels = np.array([0] * 60 + [1] * 60)
    scores = np.concatenate([np.linspace(0.05, 0.15, 60), np.linspace(0.18, 0.3, 60)])
    t, rule = choose_threshold(labels, scores)
    assert compute(labels, scores, t)["accuracy"] == 1.0 and "Youden" in rule


def test_too_few_cells_of_a_class_fall_back_to_half():
    labels = np.array([0] * 17 + [1] * 300)
    t, rule = choose_threshold(labels, np.linspace(0, 1, 317))
    assert t == 0.5 and "only 17 cells" in rule


@pytest.mark.parametrize("scores", [np.full(50, 0.31), np.linspace(0.500, 0.505, 50)])
def test_collapse_is_detected(scores):
    with pytest.raises(CollapsedModel, match="collapsed"):
        check_not_collapsed(scores, 0.5)


def test_informative_scores_pass_and_the_limits_are_where_they_say():
    assert check_not_collapsed(np.linspace(0.05, 0.95, 50), 0.5) is None  # no raise: informative
    assert check_not_collapsed(np.linspace(0.485, 0.52, 100), 0.5) is None  # 90% of scores over 0.0315 > 0.02
    with pytest.raises(CollapsedModel, match="within 0.01"):
        check_not_collapsed(np.linspace(0.495, 0.507, 100), 0.5)  # over 0.0108 < 0.02
    with pytest.raises(CollapsedModel, match="100% are called ALL"):
        check_not_collapsed(np.linspace(0.6, 0.95, 50), 0.5)  # spread, but one answer for every cell


def test_fold_summary():
    s = summarize_folds([{"accuracy": 0.8}, {"accuracy": 0.6}])
    assert s["accuracy"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "min": 0.6, "max": 0.8}


def test_the_threshold_is_raised_until_no_normal_cell_type_is_called_all_too_often():
    from trainer.metrics import cap_per_type

    rng = np.random.default_rng(0)
    lymphocytes = rng.uniform(0, 1, 200).astype(np.float32)  # a model that calls many of them blasts
    monocytes = rng.uniform(0, 0.3, 200).astype(np.float32)
    threshold, rule = cap_per_type(0.5, "Youden", {"pbc/lymphocyte": lymphocytes, "pbc/monocyte": monocytes}, 0.05)
    assert threshold > 0.9 and np.mean(lymphocytes >= threshold) <= 0.05 and "pbc/lymphocyte set it" in rule
    assert np.mean(lymphocytes >= threshold) >= 0.04  # raised just enough, not to the top

    unchanged, rule = cap_per_type(0.5, "Youden", {"pbc/monocyte": monocytes}, 0.05)
    assert unchanged == 0.5 and "no normal cell type above 5%" in rule
    few = cap_per_type(0.5, "Youden", {"pbc/basophil": np.full(19, 0.99, np.float32)}, 0.05)[0]
    assert few == 0.5  # 19 cells are too few to set the threshold
    assert cap_per_type(0.5, "Youden", {"pbc/lymphocyte": lymphocytes}, None) == (0.5, "Youden")
