"""leukoscope trainer: patient-split training on C-NMC crops (workstation, TensorFlow).

Modules that import TensorFlow (``models``, ``pipeline``, ``fit``) are imported only by the
commands that train, so ``--help`` and the split/metric code stay quick to load.
"""
