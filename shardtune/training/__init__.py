"""The training loop, its state, and stopping cleanly on a signal."""
