"""Bad invocations and malformed inputs end cleanly: exit status 2, one ``error:`` line that names the flag or
file, no traceback, no training step, and the output folder exactly as it was (a sentinel file, untouched).

Every case is a fresh process running the real ``finetuning.py`` (tests/fresh_cli.py forks it from a server
that has only imported torch, so that 80 cases cost seconds, not minutes). Each run also gets
``--max_train_step 1``: a case that wrongly passes validation trains one step, which the test catches.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fresh_cli import FreshCli

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

CUSTOM = {
    "syntax_py": "def get_custom_dataset(config, tokenizer, split):\n    return [(\n",
    "imports_py": "import no_such_module_xyz\n",
    "signature_py": "def get_custom_dataset(config):\n    return []\n",
    "raises_py": "def get_custom_dataset(config, tokenizer, split):\n    return load()\n\n\n"
                 "def load():\n    raise KeyError('text')\n",
    "returns_dict_py": "def get_custom_dataset(config, tokenizer, split):\n    return {'train': []}\n",
    "returns_empty_py": "def get_custom_dataset(config, tokenizer, split):\n    return []\n",
    "bad_collator_py": "def get_custom_dataset(config, tokenizer, split):\n    return [{'input_ids': [1, 2],"
                       " 'labels': [1, 2]}] * 8\n\n\ndef get_data_collator(tokenizer, extra):\n    return None\n",
}

# (case id, arguments, key words the single error line must contain: the flag or file it names and what would be
# valid, never a whole phrase of wording). {names} are paths from the `files` fixture.
CASES = [
    # the command line itself
    ("positional", ["alpaca_dataset"], ("unexpected argument", "'alpaca_dataset'", "--help")),
    ("positional_after_flags", ["--use_peft", "True", "samsum_dataset"], ("unexpected argument", "'samsum_dataset'")),
    ("unknown_flag", ["--lrr", "1e-4"], ("unknown flag", "--lrr", "--lr?")),
    ("unknown_config", ["--nosuch_config.x", "1"], ("'nosuch_config'", "not a config", "train_config")),
    ("two_dots", ["--fsdp_config.a.b", "1"], ("--fsdp_config.a.b", "one dot")),
    ("int_type", ["--batch_size_training", "four"], ("--batch_size_training", "int", "'four'")),
    ("bool_type", ["--use_peft", "maybe"], ("--use_peft", "True/False", "'maybe'")),
    ("enum_value", ["--enable_fsdp", "--fsdp_config.sharding_strategy", "HALF"],
     ("--fsdp_config.sharding_strategy", "FULL_SHARD", "'HALF'")),
    ("dataset_name", ["--dataset", "imagenet"], ("--dataset", "'imagenet'", "alpaca_dataset")),
    ("peft_method", ["--peft_method", "ia3"], ("--peft_method", "'ia3'", "lora")),
    ("precision", ["--precision", "fp8"], ("--precision", "bf16_mixed", "'fp8'")),
    ("batching_strategy", ["--batching_strategy", "pad"], ("--batching_strategy", "packing", "'pad'")),
    ("quantization_kind", ["--quantization", "3bit"], ("--quantization", "4bit", "'3bit'")),
    ("quantization_cpu", ["--quantization", "4bit", "--use_peft"], ("--quantization", "CUDA")),
    ("quantization_full_ft", ["--quantization", "4bit"], ("--quantization 4bit", "--use_peft")),
    ("quantization_prefix", ["--quantization", "4bit", "--use_peft", "--peft_method", "prefix"],
     ("--quantization 4bit", "--peft_method prefix", "lora")),
    ("quantization_8bit_fsdp", ["--quantization", "8bit", "--use_peft", "--enable_fsdp"],
     ("--quantization 8bit", "--enable_fsdp", "4bit")),
    ("quantization_uint8_fsdp", ["--quantization", "4bit", "--use_peft", "--enable_fsdp",
                                 "--quantization_config.quant_storage", "uint8"],
     ("--quantization_config.quant_storage", "uint8", "bfloat16")),
    ("quantization_compute_dtype", ["--quantization_config.compute_dtype", "uint8"],
     ("--quantization_config.compute_dtype", "bfloat16", "'uint8'")),
    ("lora_bias", ["--lora_config.bias", "some"], ("--lora_config.bias", "lora_only", "'some'")),
    ("no_target_modules", ["--use_peft", "--lora_config.target_modules", ""], ("--lora_config.target_modules", "at least one")),
    ("optimizer", ["--fsdp_config.optimizer", "sgd"], ("--fsdp_config.optimizer", "anyprecision", "'sgd'")),
    ("config_missing", ["--config", "{missing}.yaml"], ("--config", "{missing}.yaml", "not found")),
    ("config_unparsable", ["--config", "{bad_yaml}"], ("--config", "{bad_yaml}", "parse")),
    ("config_not_mapping", ["--config", "{list_yaml}"], ("--config", "{list_yaml}", "mapping")),
    ("config_bad_value", ["--config", "{bad_value_yaml}"], ("--lora_config.lora_dropout", "[0, 1)", "1.5")),
    # numbers out of range
    ("lora_dropout_one", ["--use_peft", "--lora_dropout", "1"], ("--lora_config.lora_dropout", "[0, 1)")),
    ("lora_dropout_negative", ["--lora_dropout", "-0.1"], ("--lora_config.lora_dropout", "[0, 1)", "-0.1")),
    ("lora_alpha_zero", ["--lora_alpha", "0"], ("--lora_config.lora_alpha", "(0, inf)")),
    ("lora_alpha_negative", ["--lora_alpha", "-16"], ("--lora_config.lora_alpha", "(0, inf)", "-16")),
    ("lora_r_zero", ["--lora_config.r", "0"], ("--lora_config.r", "[1, inf)")),
    ("seed_negative", ["--seed", "-1"], ("--seed", "[0, 4294967296)", "-1")),
    ("seed_too_big", ["--seed", "4294967296"], ("--seed", "[0, 4294967296)")),
    ("clip_zero", ["--gradient_clipping", "--gradient_clipping_threshold", "0"],
     ("--gradient_clipping_threshold", "(0, inf)")),
    ("clip_negative", ["--gradient_clipping", "True", "--gradient_clipping_threshold", "-1"],
     ("--gradient_clipping_threshold", "(0, inf)", "-1")),
    ("epochs_zero", ["--num_epochs", "0"], ("--num_epochs", "[1, inf)")),
    ("lr_inf", ["--lr", "inf"], ("--lr", "finite", "inf")),
    ("lr_nan", ["--lr", "nan"], ("--lr", "finite", "nan")),
    ("lr_zero", ["--lr", "0"], ("--lr", "(0, inf)")),
    ("lr_negative", ["--lr", "-1e-4"], ("--lr", "(0, inf)", "-0.0001")),
    ("gamma", ["--gamma", "1.5"], ("--gamma", "(0, 1]", "1.5")),
    ("weight_decay", ["--weight_decay", "-0.1"], ("--weight_decay", "[0, inf)", "-0.1")),
    ("batch_zero", ["--batch_size_training", "0"], ("--batch_size_training", "[1, inf)")),
    ("context_zero", ["--context_length", "0"], ("--context_length", "[1, inf)")),
    ("accumulation_zero", ["--gradient_accumulation_steps", "0"], ("--gradient_accumulation_steps", "[1, inf)")),
    ("keep_zero", ["--keep_last_n_checkpoints", "0"], ("--keep_last_n_checkpoints", "[1, inf)")),
    ("val_batch_zero", ["--val_batch_size", "0"], ("--val_batch_size", "[1, inf)")),
    ("workers_negative", ["--num_workers_dataloader", "-1"], ("--num_workers_dataloader", "[0, inf)")),
    ("peak_nan", ["--peak_tflops", "nan"], ("--peak_tflops", "finite")),
    ("freeze_too_many", ["--freeze_layers", "--num_freeze_layers", "99"], ("--num_freeze_layers", "99", "4 decoder")),
    # flags that would have no effect in this run: the flag, and what it needs
    ("cpu_offload_no_fsdp", ["--fsdp_config.fsdp_cpu_offload", "True"],
     ("--fsdp_config.fsdp_cpu_offload", "no effect", "--enable_fsdp")),
    ("hsdp_no_fsdp", ["--fsdp_config.hsdp", "True", "--sharding_strategy", "HYBRID_SHARD"],
     ("--fsdp_config.", "no effect", "--enable_fsdp")),
    ("shard_size_no_fsdp", ["--sharding_group_size", "2"], ("--fsdp_config.sharding_group_size", "--enable_fsdp")),
    ("replica_size_no_fsdp", ["--replica_group_size", "2"], ("--fsdp_config.replica_group_size", "--enable_fsdp")),
    ("strategy_no_fsdp", ["--fsdp_config.sharding_strategy", "SHARD_GRAD_OP"],
     ("--fsdp_config.sharding_strategy", "--enable_fsdp")),
    ("freeze_with_peft", ["--use_peft", "--freeze_layers"], ("--freeze_layers", "no effect", "--use_peft")),
    ("low_cpu_no_fsdp", ["--low_cpu_fsdp"], ("--low_cpu_fsdp", "no effect", "--enable_fsdp")),
    ("peft_checkpoint_no_peft", ["--from_peft_checkpoint", "x"], ("--from_peft_checkpoint", "no effect", "--use_peft")),
    ("flops_and_profiler", ["--flop_counter", "--use_profiler"], ("--flop_counter", "--use_profiler", "combined")),
    ("cpu_offload_one_process", ["--enable_fsdp", "--fsdp_config.fsdp_cpu_offload", "True"],
     ("--fsdp_config.fsdp_cpu_offload", "single process", "torchrun")),
    ("low_cpu_one_process", ["--enable_fsdp", "--low_cpu_fsdp"], ("--low_cpu_fsdp", "single process", "torchrun")),
    ("timeout_one_process", ["--enable_fsdp", "--dist_timeout_s", "30"], ("--dist_timeout_s", "single process")),
    ("freeze_zero_layers", ["--freeze_layers", "--num_freeze_layers", "0"], ("--num_freeze_layers", "[1, inf)")),
    ("model_name_empty", ["--model_name", ""], ("--model_name", "empty")),
    ("lora_target_missing", ["--use_peft", "--lora_config.target_modules", "nonexistent_proj"],
     ("--lora_config.target_modules", "nonexistent_proj", "q_proj")),
    ("peft_checkpoint_missing", ["--use_peft", "--from_peft_checkpoint", "{missing}/adapter"],
     ("--from_peft_checkpoint", "{missing}/adapter", "adapter_config.json")),
    ("peft_checkpoint_not_adapter", ["--use_peft", "--from_peft_checkpoint", "{empty_dir}"],
     ("--from_peft_checkpoint", "{empty_dir}", "adapter_config.json")),
    ("strategy_one_process", ["--enable_fsdp", "--sharding_strategy", "SHARD_GRAD_OP"],
     ("--fsdp_config.sharding_strategy", "single process")),
    # a field whose group is off, or which another setting makes meaningless: it would do nothing
    ("lora_r_without_peft", ["--lora_config.r", "16"], ("--lora_config.r", "no effect", "--use_peft")),
    ("plain_r_without_peft", ["--r", "16"], ("--lora_config.r", "no effect", "--use_peft")),
    ("peft_method_without_peft", ["--peft_method", "prefix"], ("--peft_method", "no effect", "--use_peft")),
    ("other_method_settings", ["--use_peft", "--peft_method", "prefix", "--lora_config.r", "8"],
     ("--lora_config.r", "no effect", "--peft_method lora")),
    ("prefix_settings_with_lora", ["--use_peft", "--prefix_config.num_virtual_tokens", "10"],
     ("--prefix_config.num_virtual_tokens", "no effect", "--peft_method prefix")),
    ("adapter_settings_without_peft", ["--llama_adapter_config.adapter_len", "4"],
     ("--llama_adapter_config.adapter_len", "no effect", "--use_peft")),
    ("custom_file_with_alpaca", ["--custom_dataset.file", "x.py"],
     ("--custom_dataset.file", "no effect", "--dataset custom_dataset")),
    ("samsum_path_with_alpaca", ["--samsum_dataset.data_path", "data/samsum"],
     ("--samsum_dataset.data_path", "no effect", "--dataset samsum_dataset")),
    ("chat_path_with_grammar", ["--dataset", "grammar_dataset", "--chat_dataset.data_path", "x.jsonl"],
     ("--chat_dataset.data_path", "no effect", "--dataset chat_dataset")),
    ("clip_threshold_without_clipping", ["--gradient_clipping_threshold", "0.5"],
     ("--gradient_clipping_threshold", "no effect", "--gradient_clipping ")),
    ("wandb_project_without_wandb", ["--wandb_config.project", "p"], ("--wandb_config.project", "--use_wandb")),
    ("wandb_mode_without_wandb", ["--wandb_config.mode", "offline"], ("--wandb_config.mode", "--use_wandb")),
    ("quant_type_without_quantization", ["--quantization_config.quant_type", "nf4"],
     ("--quantization_config.quant_type", "no effect", "--quantization 4bit")),
    ("quant_settings_with_8bit", ["--quantization", "8bit", "--use_peft", "--quantization_config.use_double_quant",
                                  "True"], ("--quantization_config.use_double_quant", "no effect", "--quantization 4bit")),
    ("keep_gathered_without_fsdp", ["--fsdp_config.keep_gathered_layers", "2"],
     ("--fsdp_config.keep_gathered_layers", "no effect", "--enable_fsdp")),
    ("hsdp_sizes_without_hsdp", ["--enable_fsdp", "--sharding_group_size", "2"],
     ("--fsdp_config.sharding_group_size", "no effect", "--fsdp_config.hsdp")),
    ("hsdp_without_hybrid", ["--enable_fsdp", "--fsdp_config.hsdp"],
     ("--fsdp_config.hsdp", "no effect", "HYBRID_SHARD")),
    ("kahan_without_anyprecision", ["--fsdp_config.use_kahan_summation", "True"],
     ("--fsdp_config.use_kahan_summation", "no effect", "anyprecision")),
    ("ac_layers_without_ac", ["--fsdp_config.fsdp_activation_checkpointing", "False",
                              "--fsdp_config.ac_every_n_layers", "2"],
     ("--fsdp_config.ac_every_n_layers", "no effect", "--fsdp_config.fsdp_activation_checkpointing")),
    ("profiler_dir_without_profiler", ["--profiler_dir", "p"], ("--profiler_dir", "no effect", "--use_profiler")),
    ("profiler_active_without_profiler", ["--profiler_active", "5"], ("--profiler_active", "--use_profiler")),
    ("flop_start_without_counter", ["--flop_counter_start", "1"], ("--flop_counter_start", "--flop_counter ")),
    ("freeze_count_without_freeze", ["--num_freeze_layers", "1"], ("--num_freeze_layers", "--freeze_layers ")),
    ("max_eval_without_validation", ["--max_eval_step", "5", "--run_validation", "False"],
     ("--max_eval_step", "no effect", "--run_validation")),
    ("val_batch_without_validation", ["--run_validation", "False", "--val_batch_size", "2"],
     ("--val_batch_size", "--run_validation")),
    ("timeout_without_fsdp", ["--dist_timeout_s", "30"], ("--dist_timeout_s", "no effect", "--enable_fsdp")),
    ("fast_kernels_with_sdpa", ["--use_fast_kernels", "--attn_implementation", "sdpa"],
     ("--use_fast_kernels", "no effect", "--attn_implementation auto")),
    ("mixed_precision_with_fp32", ["--precision", "fp32", "--mixed_precision", "False"],
     ("--mixed_precision", "no effect", "--precision auto")),
    ("keep_checkpoints_without_saving", ["--save_model", "False", "--keep_last_n_checkpoints", "3"],
     ("--keep_last_n_checkpoints", "no effect", "--save_model", "--save_every_n_steps")),
    ("checkpoint_root_without_saving", ["--save_model", "False", "--dist_checkpoint_root_folder", "ck"],
     ("--dist_checkpoint_root_folder", "no effect", "--save_model")),
    ("config_file_inactive_field", ["--config", "{inactive_yaml}"], ("--lora_config.r", "no effect", "--use_peft")),
    # a value fire turns into something else: a flag given without its value becomes True
    ("output_dir_without_value", ["--output_dir"], ("--output_dir", "needs a value")),
    ("model_name_without_value", ["--model_name"], ("--model_name", "needs a value")),
    ("dataset_without_value", ["--dataset"], ("--dataset", "needs a value")),
    ("lr_without_value", ["--lr"], ("--lr", "needs a value")),
    ("target_modules_without_value", ["--use_peft", "--lora_config.target_modules"],
     ("--lora_config.target_modules", "needs a value")),
    # values that would make the run degenerate
    ("accumulation_beyond_epoch", ["--gradient_accumulation_steps", "1000"],
     ("--gradient_accumulation_steps 1000", "at most 2")),
    ("lora_task_type", ["--use_peft", "--lora_config.task_type", "SEQ_CLS"],
     ("--lora_config.task_type", "CAUSAL_LM", "'SEQ_CLS'")),
    ("prefix_task_type", ["--use_peft", "--peft_method", "prefix", "--prefix_config.task_type", "SEQ_2_SEQ_LM"],
     ("--prefix_config.task_type", "CAUSAL_LM")),
    ("lora_inference_mode", ["--use_peft", "--lora_config.inference_mode", "True"],
     ("--lora_config.inference_mode", "frozen")),
    ("checkpoint_folder_empty", ["--dist_checkpoint_folder", ""], ("--dist_checkpoint_folder", "''", "plain name")),
    ("checkpoint_folder_path", ["--dist_checkpoint_folder", "a/b"], ("--dist_checkpoint_folder", "'a/b'", "plain name")),
    ("checkpoint_root_is_file", ["--dist_checkpoint_root_folder", "{a_file}"],
     ("--dist_checkpoint_root_folder", "{a_file}", "is a file")),
    ("profiler_dir_is_file", ["--use_profiler", "--profiler_dir", "{a_file}"], ("--profiler_dir", "{a_file}", "is a file")),
    ("torch_compile_value", ["--torch_compile", "maybe"], ("--torch_compile", "auto", "'maybe'")),
    ("attn_value", ["--attn_implementation", "flash"], ("--attn_implementation", "flash_attention_2", "'flash'")),
    ("dataset_name_field", ["--alpaca_dataset.dataset", "other"], ("--alpaca_dataset.dataset", "alpaca_dataset", "'other'")),
    ("quant_storage_value", ["--quantization", "4bit", "--use_peft", "--quantization_config.quant_storage", "int4"],
     ("--quantization_config.quant_storage", "bfloat16", "'int4'")),
    ("profiler_wait_negative", ["--use_profiler", "--profiler_wait", "-1"], ("--profiler_wait", "[0, inf)")),
    ("profiler_active_zero", ["--use_profiler", "--profiler_active", "0"], ("--profiler_active", "[1, inf)")),
    # reference fields whose feature shardtune lacks
    ("freeze_llm_only", ["--freeze_LLM_only", "True"], ("--freeze_LLM_only", "not supported", "--freeze_layers")),
    # the output folder
    ("output_empty", ["--output_dir", ""], ("--output_dir", "empty")),
    ("output_is_file", ["--output_dir", "{a_file}"], ("--output_dir", "{a_file}", "is a file")),
    ("output_under_file", ["--output_dir", "{a_file}/sub"], ("--output_dir", "{a_file}/sub", "is a file")),
    ("output_not_creatable", ["--output_dir", "/proc/shardtune_out"], ("--output_dir", "/proc/shardtune_out", "writable")),
    # the model and tokenizer
    ("model_missing", ["--model_name", "{missing}/model"], ("--model_name", "{missing}/model", "not found")),
    ("model_is_file", ["--model_name", "{a_file}"], ("--model_name", "{a_file}", "is a file")),
    ("model_no_config", ["--model_name", "{empty_dir}"], ("--model_name", "{empty_dir}", "config")),
    ("model_truncated", ["--model_name", "{truncated_model}"], ("--model_name", "{truncated_model}/model.safetensors",
                                                                 "truncated")),
    ("model_bad_header", ["--model_name", "{garbage_model}"], ("--model_name", "{garbage_model}/model.safetensors",
                                                               "safetensors file")),
    ("gguf_missing", ["--model_name", "{missing}/m.gguf"], ("--model_name", "{missing}/m.gguf", "not found")),
    ("tokenizer_missing", ["--tokenizer_name", "{missing}/tok"], ("--tokenizer_name", "{missing}/tok", "not found")),
    ("tokenizer_broken", ["--tokenizer_name", "{empty_dir}"], ("--tokenizer_name", "{empty_dir}", "tokenizer")),
    ("resume_missing", ["--resume_from", "{missing}/ckpt"], ("--resume_from", "{missing}/ckpt", "auto")),
    # data files: the flag, the file, what is wrong with it
    ("alpaca_latin1", ["--alpaca_dataset.data_path", "{latin1_json}"],
     ("--alpaca_dataset.data_path", "{latin1_json}", "UTF-8", "0xe9")),
    ("alpaca_utf16", ["--alpaca_dataset.data_path", "{utf16_json}"],
     ("--alpaca_dataset.data_path", "{utf16_json}", "UTF-16")),
    ("alpaca_empty_list", ["--alpaca_dataset.data_path", "{empty_json}"],
     ("--alpaca_dataset.data_path", "{empty_json}", "no records")),
    ("alpaca_missing", ["--alpaca_dataset.data_path", "{missing}.json"],
     ("--alpaca_dataset.data_path", "{missing}.json", "not found")),
    ("alpaca_invalid_json", ["--alpaca_dataset.data_path", "{invalid_json}"],
     ("--alpaca_dataset.data_path", "{invalid_json}", "JSON", "column 22")),
    ("alpaca_not_records", ["--alpaca_dataset.data_path", "{object_json}"],
     ("--alpaca_dataset.data_path", "{object_json}", "record [0]")),
    ("alpaca_wrong_fields", ["--alpaca_dataset.data_path", "{wrong_fields_json}"],
     ("--alpaca_dataset.data_path", "{wrong_fields_json}", "record [0]", "'instruction'")),
    ("alpaca_one_record", ["--alpaca_dataset.data_path", "{one_record_json}"], ("alpaca_dataset", "'train'", "usable")),
    ("grammar_latin1", ["--dataset", "grammar_dataset", "--grammar_dataset.train_split", "{latin1_csv}"],
     ("--grammar_dataset.train_split", "{latin1_csv}", "UTF-8")),
    ("grammar_columns", ["--dataset", "grammar_dataset", "--grammar_dataset.train_split", "{columns_csv}"],
     ("--grammar_dataset.train_split", "{columns_csv}", "'input'", "'target'", "'sentence'")),
    ("chat_utf16", ["--dataset", "chat_dataset", "--chat_dataset.data_path", "{utf16_json}"],
     ("--chat_dataset.data_path", "{utf16_json}", "UTF-16")),
    ("chat_no_messages", ["--dataset", "chat_dataset", "--chat_dataset.data_path", "{chat_bad_jsonl}"],
     ("--chat_dataset.data_path", "{chat_bad_jsonl}", "line 1", "'messages'", "'prompt'")),
    ("custom_syntax", ["--dataset", "custom_dataset", "--custom_dataset.file", "{syntax_py}"],
     ("--custom_dataset.file", "{syntax_py}", "line 2", "SyntaxError")),
    ("custom_import", ["--dataset", "custom_dataset", "--custom_dataset.file", "{imports_py}"],
     ("--custom_dataset.file", "{imports_py}", "line 1", "'no_such_module_xyz'")),
    ("custom_signature", ["--dataset", "custom_dataset", "--custom_dataset.file", "{signature_py}"],
     ("--custom_dataset.file", "{signature_py}", "get_custom_dataset(config)", "3 arguments")),
    ("custom_raises", ["--dataset", "custom_dataset", "--custom_dataset.file", "{raises_py}"],
     ("--custom_dataset.file", "{raises_py}", "line 6", "KeyError")),
    ("custom_returns_dict", ["--dataset", "custom_dataset", "--custom_dataset.file", "{returns_dict_py}"],
     ("--custom_dataset.file", "get_custom_dataset", "dict")),
    ("custom_returns_empty", ["--dataset", "custom_dataset", "--custom_dataset.file", "{returns_empty_py}"],
     ("--custom_dataset.file", "get_custom_dataset", "empty")),
    ("custom_no_function", ["--dataset", "custom_dataset", "--custom_dataset.file", "{returns_empty_py}:nope"],
     ("--custom_dataset.file", "{returns_empty_py}", "nope", "get_custom_dataset")),
    ("custom_missing", ["--dataset", "custom_dataset", "--custom_dataset.file", "{missing}.py"],
     ("--custom_dataset.file", "{missing}.py", "not found")),
    ("custom_collator_signature", ["--dataset", "custom_dataset", "--custom_dataset.file", "{bad_collator_py}"],
     ("--custom_dataset.file", "{bad_collator_py}", "get_data_collator", "'extra'")),
    # sizes that only the data can decide
    ("context_too_small", ["--context_length", "8"], ("--context_length 8", "38 tokens")),
    ("batch_larger_than_data", ["--batch_size_training", "100000"], ("--batch_size_training", "14 or less")),
]


def _write_files(d: Path, model_dir: Path) -> dict:
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE

    records = json.loads(Path(BUNDLED_ALPACA_SAMPLE).read_text())[:40]
    files = {"missing": d / "does_not_exist", "a_file": d / "a_file.txt", "empty_dir": d / "empty_dir",
             "small_alpaca": d / "small_alpaca.json"}
    files["a_file"].write_text("not a folder\n")
    files["empty_dir"].mkdir()
    files["small_alpaca"].write_text(json.dumps(records))
    text = '[{"instruction": "Say caf\u00e9", "input": "", "output": "caf\u00e9"}]'
    for name, content in {"latin1_json": text.encode("latin-1"), "utf16_json": text.encode("utf-16"),
                          "empty_json": b"[]", "invalid_json": b'[{"instruction": "a",',
                          "object_json": b'[1, 2]',
                          "wrong_fields_json": b'[{"question": "a", "answer": "b"}]',
                          "one_record_json": json.dumps(records[:1]).encode(),
                          "latin1_csv": "input,target\nSay caf\u00e9,caf\u00e9\n".encode("latin-1"),
                          "columns_csv": b"sentence,correction\na,b\n",
                          "chat_bad_jsonl": b'{"text": "hello"}\n',
                          "bad_yaml": b"lr: [1, 2\n", "list_yaml": b"- lr\n- 1\n",
                          "bad_value_yaml": b"lora_config:\n  lora_dropout: 1.5\n",
                          "inactive_yaml": b"lora_config:\n  r: 16\n"}.items():
        suffix = {"json": ".json", "csv": ".csv", "jsonl": ".jsonl", "yaml": ".yaml"}[name.rsplit("_", 1)[1]]
        files[name] = d / f"{name}{suffix}"
        files[name].write_bytes(content)
    for name, code in CUSTOM.items():
        files[name] = d / name.replace("_py", ".py")
        files[name].write_text(code)
    for name, damage in (("truncated_model", "truncate"), ("garbage_model", "garbage")):
        target = d / name
        shutil.copytree(model_dir, target)
        weights = target / "model.safetensors"
        if damage == "truncate":
            os.truncate(weights, weights.stat().st_size // 2)
        else:
            weights.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 64)
        files[name] = target
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    return _write_files(tmp_path_factory.mktemp("bad_input_files"), BUNDLED_MODEL_DIR)


@pytest.fixture(scope="module")
def fresh_cli():
    server = FreshCli(ENV)
    yield server
    server.close()


def _sentinel_folder(path: Path) -> dict:
    path.mkdir(parents=True)
    sentinel = path / "sentinel.txt"
    sentinel.write_text("keep me\n")
    os.utime(sentinel, (1_000_000_000, 1_000_000_000))
    return {"sentinel.txt": (sentinel.read_bytes(), sentinel.stat().st_mtime_ns)}


def _folder_state(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in path.rglob("*")}


def assert_clean_failure(rc: int, stdout: str, stderr: str, expected: tuple, out_dir: Path, before: dict):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert rc == 2, f"exit status {rc}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr + stdout
    assert len(errors) == 1 and all(word in errors[0] for word in expected), (expected, lines)
    assert all(ln.startswith(("error: ", "warning: ")) for ln in lines), lines  # nothing else on stderr
    assert "step 1 |" not in stdout and "Training epoch" not in stderr  # no training step
    assert "--> model " not in stdout  # refused before the model's weights were loaded
    assert _folder_state(out_dir) == before, sorted(_folder_state(out_dir))


def test_at_least_100_cases():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(case, args, expected, files, fresh_cli, tmp_path):
    names = {k: str(v) for k, v in files.items()}
    args = [a.format(**names) for a in args]
    expected = [word.format(**names) for word in expected]
    out_dir = tmp_path / "out"
    before = _sentinel_folder(out_dir)
    common = ["--output_dir", str(out_dir), "--num_workers_dataloader", "0", "--max_train_step", "1"]
    if "--dataset" not in args:  # the small Alpaca file, for the data set that reads it (others refuse the flag)
        common += ["--alpaca_dataset.data_path", names["small_alpaca"]]
    given = {a for a in args if a.startswith("--")}
    common = [x for i in range(0, len(common), 2) for x in common[i:i + 2] if common[i] not in given]
    rc, stdout, stderr = fresh_cli.run(common + args, cwd=tmp_path, log_dir=tmp_path)
    assert_clean_failure(rc, stdout, stderr, expected, out_dir, before)


def test_debug_shows_the_traceback(fresh_cli, tmp_path):
    rc, _, stderr = fresh_cli.run(["--lr", "nan", "--debug", "--output_dir", tmp_path / "o"], tmp_path, tmp_path)
    assert rc == 2 and "Traceback" in stderr and "ConfigError" in stderr and "--lr" in stderr


def test_flag_given_twice_and_context_beyond_the_model_warn(fresh_cli, tmp_path):
    """Warnings, not errors: both runs stop at the (deliberately) bad --lr after warning."""
    out = tmp_path / "o"
    rc, _, stderr = fresh_cli.run(["--seed", "1", "--seed", "2", "--lr", "nan", "--output_dir", out], tmp_path,
                                  tmp_path)
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning: ")]
    assert rc == 2 and len(warnings) == 1 and "--seed" in warnings[0] and "2 times" in warnings[0], stderr
    rc, _, stderr = fresh_cli.run(["--context_length", "5000", "--batch_size_training", "100000",
                                   "--output_dir", out], tmp_path, tmp_path)
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning: ") and "max_position_embeddings" in ln]
    assert rc == 2 and len(warnings) == 1 and "--context_length 5000" in warnings[0] and "4096" in warnings[0], stderr


def test_help_into_a_closed_pipe(tmp_path):
    """`finetuning.py --help | head -1`: no BrokenPipeError once head has gone."""
    proc = subprocess.run(f"'{sys.executable}' '{REPO / 'finetuning.py'}' --help | head -1", shell=True,
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.stdout.startswith("usage: finetuning.py") and proc.stdout.count("\n") == 1
    assert "BrokenPipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _torchrun(args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "finetuning.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["before_process_group", "after_process_group", "no_enable_fsdp"])
def test_torchrun_prints_a_config_error_once(case, files, tmp_path):
    """Two ranks meet the same bad input; rank 0 alone reports it. (torchrun's launcher then adds its own
    ChildFailedError report, which is outside finetuning.py.)"""
    out_dir = tmp_path / "out"
    before = _sentinel_folder(out_dir)
    args, expected = {
        "before_process_group": (["--enable_fsdp", "--lora_dropout", "1.5"], ("--lora_config.lora_dropout", "1.5")),
        "after_process_group": (["--enable_fsdp", "--context_length", "8"], ("--context_length 8",)),
        "no_enable_fsdp": ([], ("2 processes", "--enable_fsdp")),
    }[case]
    proc = _torchrun(["--output_dir", out_dir, "--alpaca_dataset.data_path", files["small_alpaca"], *args], tmp_path)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0
    assert len(ours) == 1 and all(word in ours[0] for word in expected), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # a worker ended with the config-error status, not a crash
    assert _folder_state(out_dir) == before
