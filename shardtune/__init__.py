"""shardtune: fine-tune Hugging Face causal LMs on one CPU, one GPU or many GPUs with FSDP2 and PEFT.
One straight path: configs -> utils/model_utils (model) -> datasets + data (batches) -> utils/fsdp_utils
(wrap) -> utils/train_utils (loop) -> model_checkpointing (checkpoints, export); see finetuning.main."""
