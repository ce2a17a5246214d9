"""Building the model: load (hub id, folder or GGUF), resize, freeze, PEFT, quantization, the loss head."""
