"""Deployment and explanations: TFLite export and measurement, LIME / occlusion explanations
and their saved artefacts. Imports only the core library."""
