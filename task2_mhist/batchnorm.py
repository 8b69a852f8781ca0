"""BatchNorm moving statistics that match the trained weights after a short run.

BatchNorm normalises by batch statistics while training and by moving averages
of them (momentum 0.99 in Keras) at inference. After n steps those averages
still weigh their starting values (mean 0, variance 1 for a new layer) by
0.99^n: 31% after the 116 steps of a 2-epoch MHIST try, so inference runs on
statistics the network never trained with and a student that fits its training
data predicts one class. `recalibrate` re-estimates them over the training set
once training ends (PreciseBN: Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021): a forward pass in training mode with the weights fixed, each
layer's moving mean and variance set to the mean of its batch statistics.
"""

import keras
import numpy as np
import tensorflow as tf

THRESHOLD = 0.01  # recalibrate while the moving averages still weigh their start by more than this


def batch_norm_layers(model):
    """Every `BatchNormalization` layer of `model`, nested models included."""
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
        stack.extend(v for v in vars(layer).values() if isinstance(v, keras.layers.Layer))  # e.g. a wrapped base
    return found


def start_weight(steps, momentum=0.99):
    """The weight the moving averages still give their starting values after `steps` updates."""
    return momentum ** max(int(steps), 0)


def needs_recalibration(model, steps):
    """Whether `model` has BatchNorm layers whose moving averages, after `steps`
    training steps, still weigh their start by more than `THRESHOLD`."""
    return any(start_weight(steps, layer.momentum) > THRESHOLD for layer in batch_norm_layers(model))


def recalibrate(model, dataset, prepare=None):
    """Sets the moving mean and variance of each BatchNorm layer of `model` that
    trains (one in inference mode, e.g. a frozen base, keeps its own) to the mean of
    its batch statistics over `dataset` (batch dicts with `"x"`, each first passed
    through `prepare`), with the weights unchanged. Returns how many layers moved."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    before = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
    sums = [[np.zeros_like(m, np.float64), np.zeros_like(v, np.float64)] for m, v in before]
    batches = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # each forward pass leaves exactly that batch's statistics
        forward = tf.function(lambda x: model(x, training=True))
        for batch in dataset:
            forward((prepare(batch) if prepare is not None else batch)["x"])
            for total, layer in zip(sums, layers):
                total[0] += layer.moving_mean.numpy()
                total[1] += layer.moving_variance.numpy()
            batches += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    moved = 0
    for layer, (mean, variance), total in zip(layers, before, sums):
        if batches and not (np.allclose(total[0] / batches, mean) and np.allclose(total[1] / batches, variance)):
            layer.moving_mean.assign((total[0] / batches).astype(mean.dtype))
            layer.moving_variance.assign((total[1] / batches).astype(variance.dtype))
            moved += 1
        else:
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
    return moved

