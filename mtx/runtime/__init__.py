"""Shared runtime of every command: checkpoints, metrics writing, progress, loading a trained model."""
