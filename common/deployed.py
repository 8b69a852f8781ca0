"""Students that predict through a method's head (CID's intervention).

Most methods train the student as it is and it predicts with its own logits. A
method whose `prediction_head(options, num_classes)` returns a layer changes
that: the deployed student is `with_head(student, head, feature_model)`, a
Keras model `x -> head([embedding, logits])`, trained, saved, evaluated,
counted and exported as one model.
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

