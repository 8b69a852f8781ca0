"""kdtoolkit, the knowledge-distillation library: this folder is its core (the `Distiller`
keras.Model, losses, the training step, checkpoints, data, features, metrics, FLOPs,
device and distribution settings, files); `methods/` the registered methods; `speed/`,
`deploy/` and `runner/` the layers above it (docs/outputs.md, "Layout")."""
