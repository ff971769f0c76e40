"""leukoscope edge: the device side, and the contracts every side shares.

Research and screening aid, not a diagnostic device. Nothing here imports TensorFlow:
the Raspberry Pi has none. ``edge.preprocessing`` and ``edge.bundle`` are the contracts the
trainer and the quantizer import, so that the pixels a model learns from are the pixels it
sees on the device. Reading labelled data sets is training's business (``trainer.dataset``).
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "leukoscope is a research and screening aid, not a diagnostic device: "
    "every result must be reviewed by a qualified person."
)

#: What a person reads for each class label: "all"/"hem" are C-NMC's folder names, jargon to a lab.
#: JSON, topics and file names keep the labels; annotated frames and console lines use these words.
LABEL_WORDS = {"all": "ALL blast", "hem": "normal"}


def in_words(label: str) -> str:
    """A class label, or a ``source/cell_type`` group name, as a lab reads it ("cnmc/hem" -> "cnmc/normal")."""
    group, slash, name = label.rpartition("/")
    return group + slash + LABEL_WORDS.get(name, name)
