"""Saving, resuming and converting checkpoints."""
