"""Write a randomly initialised Llama of a real shape as a Hugging Face folder (for GPU benchmarks).

    python benchmarks/make_random_model.py --shape llama3.1-8b --out /tmp/llama8b [--layers 16]

Weights are created on the GPU in bf16 (seeded) and saved as safetensors shards with the bundled
byte-level tokenizer (its 2,048 ids are a subset of the model's vocabulary, so batches are valid; the
vocabulary size, and hence the embedding and output-layer cost, is the real one).
"""
import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    # Published Llama 3 geometries (hidden, layers, heads, kv heads, MLP, vocab, tied embeddings).
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "llama3.1-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=0, help="override the number of decoder layers (0: real)")
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    cfg = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, dtype="bfloat16")
    t0 = time.time()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, max_shard_size="5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL_DIR / name, out / name)
    print(f"{args.shape} ({shape['num_hidden_layers']} layers): {n / 1e9:.2f}B params -> {out} "
          f"in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
