"""leukoscope trainer: patient-split training on C-NMC crops (workstation, TensorFlow).

Modules that import TensorFlow (``models``, ``pipeline``, ``fit``) are imported only by the
commands that train, so ``--help`` and the split/metric code stay quick to load.
"""

from __future__ import annotations

#: The published CNN's input side: its 30.6M parameters are those of a 256x256 input.
SEED_INPUT_SIZE = 256


def default_input_size(kind: str) -> int:
    """The input side of a model kind unless ``--image-size`` says otherwise: the edge model takes the
    crop contract's size, so that it sees the cells the device cuts; the seed model its published size."""
    from edge.preprocessing import DEFAULT_CONTRACT

    return SEED_INPUT_SIZE if kind == "seed" else DEFAULT_CONTRACT.size
