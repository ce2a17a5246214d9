"""The path of a run: config parsing, process groups, model loading, PEFT, sharding, loss and the training
loop, plus the file and fault handling they need (atomic writes, disk space, preemption, RNG state)."""
