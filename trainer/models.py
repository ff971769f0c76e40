"""The two architectures: the published CNN (baseline) and the edge model (what ships).

Both take uint8-range RGB (0..255, as ``edge.preprocessing`` makes it) and scale inside the
model, so an int8 export with uint8 input consumes the device's bytes unchanged.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from trainer import SEED_INPUT_SIZE

SEED_PARAMETERS = 30_595_265


def seed_model(input_size: int = SEED_INPUT_SIZE) -> keras.Model:
    """The published 4-conv CNN, exactly (30,595,265 parameters at 256x256, RMSprop)."""
    inputs = keras.Input((input_size, input_size, 3), name="crop")
    x = layers.Rescaling(1 / 255)(inputs)
    for _ in range(2):
        x = layers.Conv2D(64, 3, activation="relu")(x)
        x = layers.Conv2D(64, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(0.5)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="p_all")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


#: Plain ReLU. With ReLU6 every activation was quantized on the fixed [0, 6] range, although most
#: values are far smaller, and int8 scores came out biased by about +0.05 (measured).
ACTIVATION_CAP = None


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(ACTIVATION_CAP, name=f"{name}_relu")(x)


def _separable(x, filters: int, stride: int, name: str):
    """Depthwise 3x3 + pointwise 1x1, each followed by a batch norm that folds into it."""
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(ACTIVATION_CAP, name=f"{name}_dw_relu")(x)
    return _conv_bn(x, filters, 1, 1, f"{name}_pw")


#: The edge model's pooled-features layer (the one before its decision): the source adversary and the
#: source probe (``benchmarks/bench_source_probe.py``) read it by this name.
POOLED = "pool"
EDGE_WIDTHS = (32, 64, 64, 128, 128, 256, 256)
EDGE_STRIDES = (1, 2, 1, 2, 1, 2, 1)
#: Blocks built as full 3x3 convolutions instead of depthwise-separable ones. Measured on
#: cnmc-dev (runs/edge-*, same split): all-separable drifted ~16% (relative) from float after the
#: first two blocks under int8 (few channels, per-channel depthwise scales), decision agreement
#: 0.965; two full blocks first: 0.959 agreement, validation AUC 0.821 vs 0.776; an all-full-conv
#: net: 0.880. The first two stay full convolutions (+35M MACs at 128 px).
EDGE_FULL_CONV_BLOCKS = 2


def edge_model(input_size: int, width: float = 1.0, dropout: float = 0.3) -> keras.Model:
    """A MobileNet-style CNN built only from ops the Edge TPU compiler maps.

    Conv/DepthwiseConv + folded batch norm + ReLU, a global-average-pool head and one
    sigmoid unit: ~163k parameters at width 1.0 (about 200 KB as int8), static shapes.
    """
    inputs = keras.Input((input_size, input_size, 3), name="crop")
    x = layers.Rescaling(1 / 255, name="scale")(inputs)
    x = _conv_bn(x, max(8, int(16 * width)), 3, 2, "stem")
    for number, (filters, stride) in enumerate(zip(EDGE_WIDTHS, EDGE_STRIDES)):
        if number < EDGE_FULL_CONV_BLOCKS:
            x = _conv_bn(x, max(8, int(filters * width)), 3, stride, f"block{number}")
        else:
            x = _separable(x, max(8, int(filters * width)), stride, f"block{number}")
    x = layers.GlobalAveragePooling2D(name=POOLED)(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="p_all")(x)
    return keras.Model(inputs, outputs, name="edge_cnn")


@keras.saving.register_keras_serializable(package="leukoscope")
class GradientReversal(layers.Layer):
    """Identity going forward; the gradient times ``-strength`` going back (Ganin & Lempitsky, 2015).
    Put before a head that guesses a cell's source, it trains the trunk to make that guess fail, so
    the features stop naming the lab that made the image."""

    def __init__(self, strength: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.strength = strength
        # A variable, not a constant traced into the graph: ``AdversaryRamp`` raises it epoch by epoch.
        self.current = self.add_weight(shape=(), initializer=keras.initializers.Constant(strength), trainable=False,
                                       name="current_strength")

    def call(self, x):
        frozen = ops.stop_gradient(x)
        return frozen + ops.cast(self.current, x.dtype) * (frozen - x)  # value x; d/dx = -strength

    def get_config(self) -> dict:
        return {**super().get_config(), "strength": self.strength}


class AdversaryRamp(keras.callbacks.Callback):
    """Raise the reversal from 0 to its full strength over training, as Ganin & Lempitsky do
    (2 / (1 + exp(-10 p)) - 1, p the share of epochs done): early features are noise, and a full
    push against a head that has learnt nothing yet only shakes the decision."""

    def __init__(self, layer: GradientReversal, epochs: int):
        super().__init__()
        self.layer, self.epochs = layer, max(1, epochs)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        progress = epoch / self.epochs
        self.layer.current.assign(self.layer.strength * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0))


class BatchNormRecalibration(keras.callbacks.Callback):
    """Batch-norm statistics measured afresh for the averaged weights before each validation (as SWA does).
    Why: the moving means and variances follow the last few steps' weights (momentum 0.9), while the
    average lags them by hundreds of steps; validated with the mismatch, the averaged edge model called
    every validation cell normal for its first 6 epochs. ``batches``: training batches, augmented as in
    training; their statistics are averaged alike. List it after ``keras.callbacks.SwapEMAWeights``,
    which puts the averaged weights in the model when validation begins."""

    def __init__(self, batches, count: int = 32):
        super().__init__()
        self.batches, self.count = batches, count

    def on_test_begin(self, logs=None) -> None:
        norms = [layer for layer in self.model.layers if isinstance(layer, layers.BatchNormalization)]
        momenta = [layer.momentum for layer in norms]
        try:
            for seen, batch in enumerate(self.batches.take(self.count)):
                for layer in norms:
                    layer.momentum = seen / (seen + 1)  # a running mean: every batch weighs alike
                self.model(batch[0], training=True)
        finally:
            for layer, momentum in zip(norms, momenta):
                layer.momentum = momentum


def with_source_head(model: keras.Model, sources: int, strength: float) -> keras.Model:
    """``model`` with a second output, ``source`` (softmax over ``sources``), fed from its pooled
    features through a gradient reversal: domain-adversarial training. Only ``p_all`` is saved and exported."""
    x = GradientReversal(strength, name="reverse_gradient")(model.get_layer(POOLED).output)
    x = layers.Dense(64, activation="relu", name="source_hidden")(x)
    source = layers.Dense(sources, activation="softmax", name="source")(x)
    return keras.Model(model.inputs, {"p_all": model.outputs[0], "source": source}, name=f"{model.name}_adversarial")


def build(kind: str, input_size: int, weight_average: float = 0.0) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """The model and the optimizer it is trained with. ``weight_average`` > 0: the optimizer also keeps an
    exponential moving average of the weights with that momentum (Polyak averaging), which
    ``keras.callbacks.SwapEMAWeights`` puts in the model for validation and for what is kept."""
    average = {"use_ema": True, "ema_momentum": weight_average} if weight_average else {}
    if kind == "seed":
        return seed_model(input_size), keras.optimizers.RMSprop(learning_rate=1e-4, **average)
    if kind == "edge":
        return edge_model(input_size), keras.optimizers.Adam(learning_rate=2e-3, **average)
    raise ValueError(f"unknown model kind {kind!r}")
