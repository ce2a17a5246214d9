"""Where results go: the output folder and its lock, resumable checkpoints and their integrity checks, the
exported model or adapter, the converter from a checkpoint to a Hugging Face folder, the adapter merger."""
