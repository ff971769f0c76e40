"""leukoscope edge: the device side, and the contracts every side shares.

Research and screening aid, not a diagnostic device. Nothing here imports TensorFlow:
the Raspberry Pi has none. ``edge.preprocessing``, ``edge.bundle`` and ``edge.dataset``
are the contracts the trainer and the quantizer import, so that the pixels a model
learns from are the pixels it sees on the device.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "leukoscope is a research and screening aid, not a diagnostic device: "
    "every result must be reviewed by a qualified person."
)
