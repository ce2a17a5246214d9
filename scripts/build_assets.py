"""Rebuild the files that ship in shardtune/assets (run from the repository root).

    python scripts/build_assets.py --alpaca ../shared/data/alpaca/alpaca_data.json

* alpaca_sample/: the first 2,000 records of Stanford Alpaca (CC BY-NC 4.0; its license beside it).
* tiny-llama/: a byte-level BPE tokenizer (vocab 2,048) trained on that sample, and a randomly
  initialised 4-layer Llama (hidden 128, grouped-query attention) saved as safetensors.
Deterministic: the same inputs give the same files.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "shardtune" / "assets"
N_RECORDS = 2000
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpaca", required=True, help="path to alpaca_data.json")
    args = ap.parse_args()
    src = Path(args.alpaca)
    records = json.loads(src.read_text(encoding="utf-8"))[:N_RECORDS]
    sample_dir = ASSETS / "alpaca_sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    (sample_dir / "alpaca_sample.json").write_text(json.dumps(records, indent=1, ensure_ascii=True) + "\n")
    shutil.copy(src.parent / "DATA_LICENSE", sample_dir / "DATA_LICENSE")
    (sample_dir / "PROVENANCE.txt").write_text(
        f"The first {N_RECORDS} records of Stanford Alpaca (tatsu-lab/stanford_alpaca alpaca_data.json, as "
        "reconstructed in the project's shared data; see its PROVENANCE), unchanged.\n"
        "License: CC BY-NC 4.0 (DATA_LICENSE, copied unmodified). Non-commercial use only.\n")

    texts = []
    for r in records:
        texts += [r["instruction"], r.get("input", ""), r["output"]]
    texts += ["Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n\n### Input:\n\n### Response:"] * 50
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="right", model_max_length=4096)
    tok.chat_template = CHAT_TEMPLATE
    out = ASSETS / "tiny-llama"
    if out.exists():
        shutil.rmtree(out)
    tok.save_pretrained(out)

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    (out / "README.md").write_text(
        "# tiny-llama\n\nA randomly initialised 4-layer Llama (hidden 128, 4 heads, 2 KV heads, vocab 2,048; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) and a byte-level BPE tokenizer trained on "
        "the bundled Alpaca sample. It exists so that `python finetuning.py` runs anywhere in seconds; it knows "
        "no language until you fine-tune it. Rebuilt by scripts/build_assets.py.\n")
    print("wrote", out, sum(p.numel() for p in model.parameters()), "params")


if __name__ == "__main__":
    main()
