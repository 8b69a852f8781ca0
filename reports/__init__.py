"""Report generation from saved results (no retraining)."""
