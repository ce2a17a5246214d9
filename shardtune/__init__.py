"""shardtune: fine-tune Hugging Face causal LMs on one CPU, one GPU or many GPUs with FSDP2 and PEFT.
One straight path: configs -> models (checked inputs) -> datasets + data (batches) -> models (the model) -> policies
(wrap, optimizer) -> training (loop) -> model_checkpointing (checkpoints, export); see finetuning.main."""
