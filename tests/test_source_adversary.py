"""Domain-adversarial training (``trainer fit --source-adversary``): which cells the source head sees,
that the reversal really reverses, and a real (tiny) run that writes a single-output model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.errors import UserError
from trainer.dataset import Sample
from trainer.fit import source_targets

pytestmark = pytest.mark.slow


def _sample(source: str, cell_type: str, patient: str, label: int = 0) -> Sample:
    return Sample(Path(f"/{source}/{cell_type}/{patient}.png"), label, patient, source, cell_type)


def test_the_source_head_compares_like_with_like():
    samples = ([_sample("cnmc", "hem", f"H{i % 2}") for i in range(10)] + [_sample("cnmc", "all", "7", 1)] * 30
               + [_sample("pbc", "lymphocyte", f"p{i}") for i in range(40)] + [_sample("pbc", "neutrophil", f"n{i}") for i in range(50)])
    index, weights, names = source_targets(samples)
    assert names == ["cnmc", "pbc"]
    kinds = np.array([s.cell_type for s in samples])
    # Normal B-cells and lymphocytes only: a blast or a neutrophil told from a B-cell is morphology, not the lab.
    assert np.all(weights[(kinds == "all") | (kinds == "neutrophil")] == 0)
    # Each source's share weighs alike (10 C-NMC cells against 40 PBC ones), so guessing "PBC" cannot win.
    assert weights[kinds == "hem"].sum() == pytest.approx(weights[kinds == "lymphocyte"].sum())
    assert weights.mean() == pytest.approx(1.0)  # as large, in all, as the decision loss's weights
    assert set(index[kinds == "hem"]) == {0} and set(index[kinds == "lymphocyte"]) == {1}


def test_no_shared_kind_is_a_clear_error():
    with pytest.raises(UserError, match="needs one kind of cell from two sources"):
        source_targets([_sample("cnmc", "hem", "H1"), _sample("cnmc", "all", "3", 1), _sample("pbc", "monocyte", "m1")])


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    import tensorflow as tf

    from trainer.models import GradientReversal

    values = tf.constant([[1.0, -2.0, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = GradientReversal(0.4)(values)
        loss = tf.reduce_sum(out * tf.constant([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(out.numpy(), values.numpy())
    np.testing.assert_allclose(tape.gradient(loss, values).numpy(), [[-0.4, -0.8, -1.2]], rtol=1e-6)


def test_the_reversal_ramps_up_to_its_strength():
    from trainer.models import AdversaryRamp, GradientReversal

    layer = GradientReversal(2.0)
    ramp = AdversaryRamp(layer, epochs=10)
    seen = []
    for epoch in range(10):
        ramp.on_epoch_begin(epoch)
        seen.append(float(layer.current.numpy()))
    assert seen[0] == 0.0 and all(a < b for a, b in zip(seen, seen[1:])) and 1.9 < seen[-1] < 2.0


def test_fit_with_a_source_adversary_writes_the_decision_model_alone(tmp_path, tiny_data, capsys):
    import keras

    from trainer.cli import main

    other = tmp_path / "other"  # a second lab: the same kind of cell (normal lymphocytes) in a cell-type folder
    (other / "lymphocyte").mkdir(parents=True)
    for path in sorted((tiny_data / "hem").glob("*.png"))[:12]:
        shutil.copy(path, other / "lymphocyte" / path.name)
    run = tmp_path / "run"
    assert main(["fit", "--data", str(tiny_data), "--data", f"{other}=0.0555", "--out", str(run), "--epochs", "2",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--image-size", "32", "--val-fraction", "0.34",
                 "--allow-collapse", "--source-adversary", "0.5", "--compose-share", "0"]) == 0
    err = capsys.readouterr().err
    assert "source adversary (strength 0.5)" in err
    model = keras.models.load_model(run / "model.keras")
    assert len(model.outputs) == 1 and model.output_shape == (None, 1)  # what quantize export takes
    assert "source_loss" in (run / "history.csv").read_text().splitlines()[0]
    assert json.loads((run / "config.json").read_text())["source_adversary"] == 0.5


def test_the_adversary_refuses_the_seed_model(capsys, tmp_path):
    from trainer.cli import main

    assert main(["fit", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--model", "seed", "--source-adversary", "1"]) == 2
    err = capsys.readouterr().err
    assert "--source-adversary works with the edge model only" in err and len(err.strip().splitlines()) == 1
