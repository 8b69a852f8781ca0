"""Shared core of the knowledge-distillation toolkit: losses, training loop, FLOPs, results."""
