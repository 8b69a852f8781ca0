"""Students that predict through a method's head (CID's intervention).

Most methods train the student as it is and it predicts with its own logits. A
method whose `prediction_head(options, num_classes)` returns a layer changes
that: the deployed student is `with_head(student, head, feature_model)`, a
Keras model `x -> head([embedding, logits])`, trained, saved, evaluated,
counted and exported as one model. `plain_keras(model)` rewrites such a
model in Keras' built-in layers (for CID: Rescaling, Softmax, Dense, Concatenate),
so that its `.keras` file loads with `keras.models.load_model` where this toolkit
is not installed.
"""

import keras


def with_head(student, head, feature_model):
    """`x -> head([embedding (batch, d), logits (batch, K)])` over `student`'s layers;
    `feature_model(student)` gives `x -> {"logits", "embedding", ...}`. The feature
    model is kept as the result's `student_features` (what the method reads)."""
    features = feature_model(student)
    x = keras.Input(student.input_shape[1:])
    outputs = features(x)
    model = keras.Model(x, head([outputs["embedding"], outputs["logits"]]), name=f"{student.name}_{head.name}")
    model.student_features = features
    return model


def student_features(model):
    """The student's feature model inside a `with_head` model, else None."""
    return getattr(model, "student_features", None)


def plain_keras(model):
    """An equivalent `keras.Model` of `model` made of Keras' built-in layers, for saving
    (`model.save("student.keras")`) and loading where this toolkit is not importable.

    `model`: a trained `with_head` student, `x (batch, ...) -> head([embedding (batch, d),
    logits (batch, K)]) (batch, K)`. The result is `x -> head's built-in form (batch, K)`,
    float32, over the same feature layers (shared, not copied): for CID's `Intervention`
    (`Intervention.builtin_outputs`) `Dense(K)([embedding, Dense(d, no bias)(Softmax(
    Rescaling(1/T)(logits)))])` holding g's kernel `(2d, K)` and bias `(K,)` and the
    dictionary D `(K, d)` as kernels, copied at this call, when the head is `active`,
    else the logits. Its name is `model`'s and its `student_features` the same feature
    model. A model without such a head (every other method's student) is returned
    unchanged. Predictions equal `model`'s to float32 round-off (1e-6) under a float32
    policy; under a mixed one the Intervention reads D rounded to the compute dtype
    (Keras' autocast inside its call; its training step does not), this model does not."""
    heads = [layer for layer in model.layers if hasattr(layer, "builtin_outputs")]
    if not heads:
        return model
    if len(heads) > 1:
        raise ValueError(f"{model.name} has {len(heads)} prediction heads ({', '.join(h.name for h in heads)}); "
                         "plain_keras takes a with_head student, which has one")
    head = heads[0]
    node = next(node for nodes in model._nodes_by_depth.values() for node in nodes if node.operation is head)
    embedding, logits = node.input_tensors
    builtin = keras.Model(model.inputs, head.builtin_outputs(embedding, logits), name=model.name)
    features = student_features(model)
    if features is not None:
        builtin.student_features = features
    return builtin
