"""FLOPs of a training step: the analytic count behind MFU, and a measured count of one step.

Analytic count (PaLM, arXiv 2204.02311 App. B; the convention of nanoGPT and torchtitan), per input token
of a sequence of length T::

    6 * N_trainable + 4 * N_frozen + 12 * L * H * Q * T

* N are the *matrix* parameters: the weights of every linear layer, the output layer included and
  LoRA's A/B included; embedding look-ups, norms and biases are not matmuls and are left out. A tied
  output layer counts (its weight is multiplied), the look-up does not.
* A trainable weight costs 2 FLOPs per token forward, 2 for the input gradient and 2 for the weight
  gradient (6). A frozen weight (LoRA's base model, --freeze_layers) needs no weight-gradient matmul: 4.
* 12 * L * H * Q * T is QK^T and AV, forward (4) and backward (8), with H the *query* heads (grouped-query
  attention broadcasts k/v, the matmuls are as large as with H k/v heads), Q the head dim and no causal
  discount. Recomputation (activation checkpointing, flash attention's backward) is not counted.

Measured count: :class:`FlopCounter` runs ``torch.utils.flop_counter.FlopCounterMode`` over exactly one
optimizer step (forward, backward, optimizer) after --flop_counter_start warm-up steps, and times the next
step without the counter (which slows the step it watches), with the device synchronised at both ends. It
counts the matmuls that were dispatched, so it *does* see recomputation and the skipped weight gradients of
frozen layers. The SDPA formulas are replaced by grouped-query-aware ones
that also cover PyTorch's CPU flash kernel (see :func:`sdpa_flop_formulas`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from shardtune.observability.metrics import StepObserver
from shardtune.utils import distributed
from shardtune.utils.logging import warn


# ---------------------------------------------------------------------------------------------
# Analytic count
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFlops:
    """The numbers the analytic formula needs, read once from the model."""

    trainable_matrix_params: int
    frozen_matrix_params: int
    num_layers: int
    num_heads: int
    head_dim: int
    head_params: int = 0            # output layer (in x out), part of the matrix parameters above
    head_trainable: bool = False

    def per_token(self, seq_len: int) -> float:
        """FLOPs of forward + backward for one token of a sequence of ``seq_len`` tokens."""
        dense = 6 * self.trainable_matrix_params + 4 * self.frozen_matrix_params
        return float(dense + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len)

    def batch(self, shape: Sequence[int]) -> float:
        """FLOPs of forward + backward of one (batch, seq_len) batch: every input token, padding included."""
        b, t = int(shape[0]), int(shape[-1])
        return self.per_token(t) * b * t

    def head_flops_per_token(self) -> float:
        return float((6 if self.head_trainable else 4) * self.head_params)

    def layer_forward_per_token(self, seq_len: int) -> float:
        """FLOPs of the decoder layers' forward alone, for one token: what activation checkpointing runs again
        in backward (every matrix but the output layer, plus the attention scores and their use)."""
        matrices = self.trainable_matrix_params + self.frozen_matrix_params - self.head_params
        return float(2 * matrices + 4 * self.num_layers * self.num_heads * self.head_dim * seq_len)


def _linear_size(module: nn.Module) -> Optional[int]:
    """in x out of a linear layer (nn.Linear and its subclasses such as bitsandbytes', HF's Conv1D)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features) * int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):  # GPT-2 style (in, out) weight
        return int(module.weight.shape[0]) * int(module.weight.shape[1])
    return None


def count_model_flops(model: nn.Module, config=None) -> ModelFlops:
    """Analytic FLOP parameters of ``model`` (a CausalLMWithLoss, a PeftModel or a plain HF model).

    ``config`` defaults to the transformers config found on the model. Works on sharded (FSDP2) models:
    sizes come from the layers' in/out features, not from local shards.
    """
    base = getattr(model, "base_model", model)  # CausalLMWithLoss.base_model: the transformers model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:  # PeftModel
        base = base.get_base_model()
    config = config or getattr(base, "config", None) or getattr(model, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    trainable = frozen = 0
    head_params, head_trainable = 0, False
    for module in model.modules():
        size = _linear_size(module)
        if size is None:
            continue
        weight = getattr(module, "weight", None)
        is_trainable = weight is not None and weight.requires_grad
        if is_trainable:
            trainable += size
        else:
            frozen += size
        if module is head:
            head_params, head_trainable = size, is_trainable
    layers = heads = head_dim = 0
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if text is not None:
        layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        heads = int(getattr(text, "num_attention_heads", 0) or 0)
        hidden = int(getattr(text, "hidden_size", 0) or 0)
        head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    if not (layers and heads and head_dim):
        warn("FLOP count: attention geometry not found in the model config; the attention term is left out")
        layers = heads = head_dim = 0
    return ModelFlops(trainable, frozen, layers, heads, head_dim, head_params, head_trainable)


# ---------------------------------------------------------------------------------------------
# Grouped-query-aware SDPA formulas for FlopCounterMode
# ---------------------------------------------------------------------------------------------
def _sdpa_forward_flops(q_shape, k_shape, v_shape) -> int:
    """QK^T and AV with k/v broadcast to the query heads (GQA/MQA): 2*b*hq*sq*sk*(dq + dv)."""
    b, hq, sq, dq = q_shape
    _, hkv, sk, _ = k_shape
    dv = v_shape[-1]
    if hq % max(hkv, 1):
        raise ValueError(f"SDPA FLOPs: {hq} query heads is not a multiple of {hkv} key/value heads")
    return 2 * b * hq * sq * sk * (dq + dv)


def _sdpa_backward_flops(q_shape, k_shape, v_shape) -> int:
    """Backward of fused attention as the kernels run it: the scores are recomputed (QK^T), then dP = dO V^T,
    dV = P^T dO, dQ = dS K, dK = dS^T Q. Five matmuls, the same bookkeeping as PyTorch's own formula."""
    b, hq, sq, dq = q_shape
    _, _, sk, _ = k_shape
    dv = v_shape[-1]
    return 2 * b * hq * sq * sk * (dq + dv + dv + dq + dq)


def _forward_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_forward_flops(query_shape, key_shape, value_shape)


def _backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_backward_flops(query_shape, key_shape, value_shape)


def sdpa_flop_formulas() -> Dict[object, object]:
    """``custom_mapping`` for FlopCounterMode: every fused SDPA kernel (CUDA flash / memory-efficient /
    cuDNN, CPU flash, the "overrideable" one of other backends), counting grouped-query attention with k/v
    repeated to the query heads. PyTorch before 2.10 asserted equal head counts ("sdpa_flop_count:
    query/key/value shapes are incompatible") on Llama-3 shapes, and no version counts the CPU kernel."""
    aten = torch.ops.aten
    forward = ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_fused_attention_overrideable"]
    mapping: Dict[object, object] = {}
    for name in forward:
        for op_name, formula in ((name, _forward_formula), (name + "_backward", _backward_formula)):
            op = getattr(aten, op_name, None)
            if op is not None:
                mapping[op] = formula
    return mapping


def flop_counter_mode(display: bool = False, depth: int = 2):
    """A FlopCounterMode that counts grouped-query SDPA and the CPU attention kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=display, depth=depth, custom_mapping=sdpa_flop_formulas())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


# ---------------------------------------------------------------------------------------------
# Counting one real training step
# ---------------------------------------------------------------------------------------------
class FlopCounter(StepObserver):
    """--flop_counter: count the FLOPs of step ``start + 1`` (after ``start`` warm-up steps), time the step
    after it, and report TFLOP/s per GPU, MFU and the comparison with the analytic count.

    Counting: FlopCounterMode is entered when step ``start + 1`` starts and left when it ends, so it holds
    exactly one forward, backward and optimizer step of every micro-batch. Timing: the counter intercepts
    every op in Python, which slows a GPU step several-fold, so the time comes from the *next* step, run
    without the counter, with the device synchronised at both ends; its FLOPs are the counted ones scaled by
    the analytic ratio of the two steps (1 when the shapes are equal, as with packing). When the run ends
    right after the counted step, that step's own (slowed) time is used and the report says so. On several
    ranks counts and times are averaged (each rank counts its own work); every rank calls this at the same
    step, so the all-reduce is safe.
    """

    def __init__(self, start: int, device: torch.device, model_flops: Optional[ModelFlops] = None,
                 peak_tflops: Optional[float] = None, recomputes_layers: float = 0.0, world_size: int = 1,
                 is_main: bool = True):
        self.start = start
        # Given, not read from the process group: how many ranks the counts are averaged over, and whether
        # this process prints the report.
        self.world_size, self.is_main = world_size, is_main
        # activation checkpointing: the share of the layers whose forward runs twice (1.0: all of them)
        self.recomputes_layers = float(recomputes_layers)
        self.device = device
        self.model_flops = model_flops
        self.peak_tflops = peak_tflops
        self._mode = None
        self._t0 = 0.0
        self._counted: Optional[dict] = None  # after the counted step: flops, seconds, record
        self._timing = False
        self.result: Optional[dict] = None

    def on_step_start(self, state) -> None:
        if self.result is not None:
            return
        if self._counted is None and self._mode is None and state.step == self.start:
            synchronize(self.device)
            self._mode = flop_counter_mode()
            self._mode.__enter__()
            self._t0 = time.perf_counter()
        elif self._counted is not None:  # the step after the counted one: time it undisturbed
            synchronize(self.device)
            self._timing = True
            self._t0 = time.perf_counter()

    def on_step_end(self, state, record: dict) -> None:
        if self._mode is not None:
            synchronize(self.device)
            seconds = time.perf_counter() - self._t0
            self._mode.__exit__(None, None, None)
            flops = float(self._mode.get_total_flops())
            self._mode = None
            world = self.world_size
            flops, seconds = (v / world for v in distributed.all_reduce_sum(
                torch.tensor([flops, seconds], dtype=torch.float64, device=self.device)).tolist())
            self._counted = {"flops": flops, "seconds": seconds, "record": dict(record)}
        elif self._timing:
            synchronize(self.device)
            world = self.world_size
            seconds = distributed.all_reduce_sum(torch.tensor(time.perf_counter() - self._t0, dtype=torch.float64,
                                                              device=self.device)).item() / world
            self._timing = False
            counted = self._counted
            scale = (record["model_flops"] / counted["record"]["model_flops"]
                     if record.get("model_flops") and counted["record"].get("model_flops") else 1.0)
            self.result = self._report(counted["record"], counted["flops"], counted["seconds"],
                                       timed_step=state.step, timed_flops=counted["flops"] * scale, seconds=seconds)

    def _report(self, record: dict, flops: float, counted_seconds: float, timed_step: Optional[int],
                timed_flops: float, seconds: float) -> dict:
        world = self.world_size
        step = record["step"]
        tflops = timed_flops / max(seconds, 1e-12) / 1e12
        result = {"step": step, "measured_flops": flops, "counted_step_seconds": counted_seconds,
                  "timed_step": timed_step, "seconds": seconds, "tflops_per_gpu": tflops,
                  "mfu": tflops / self.peak_tflops if self.peak_tflops else None}
        timing = (f"step {timed_step} (run without the counter) took {seconds:.3f} s" if timed_step is not None
                  else f"timed under the counter, which slows the step: {seconds:.3f} s")
        lines = [f"--> FLOP counter: step {step} = {flops / 1e12:.4g} TFLOP per GPU (forward, backward, optimizer); "
                 f"{timing} -> {tflops:.4g} TFLOP/s per GPU"
                 + (f", MFU {100 * result['mfu']:.1f}% of {self.peak_tflops:g}" if self.peak_tflops else "")]
        analytic = record.get("model_flops")
        if analytic:
            analytic /= world
            result["analytic_flops"] = analytic
            result["ratio"] = flops / analytic
            lines.append(f"    analytic count (6N + 12LHQT per input token): {analytic / 1e12:.4g} TFLOP per GPU; "
                         f"measured / analytic = {result['ratio']:.3f}")
            mf = self.model_flops
            unsupervised = record.get("input_tokens", 0) - record.get("tokens", 0)
            if mf is not None:
                # The hardware's work differs from the model's: the loss applies the output layer only where a
                # label is supervised (models/loss.py), and activation checkpointing runs every layer's forward
                # again in backward. MFU counts the model's work; this is what the counter should see.
                expected, how = analytic, []
                if mf.head_params and unsupervised > 0:
                    expected -= mf.head_flops_per_token() * unsupervised / world
                    how.append("the output layer at supervised positions only")
                if self.recomputes_layers and record.get("input_tokens"):
                    seq = record.get("seq_len") or 0
                    tokens = record["input_tokens"] / world
                    expected += mf.layer_forward_per_token(seq) * tokens * self.recomputes_layers
                    how.append("activation checkpointing's second forward of every layer" if self.recomputes_layers == 1
                               else f"activation checkpointing's second forward of {self.recomputes_layers:.0%} of "
                                    "the layers")
                if how:
                    result["expected_flops"] = expected
                    lines.append(f"    analytic with {' and '.join(how)}: {expected / 1e12:.4g} TFLOP; measured / "
                                 f"that = {flops / expected:.3f}")
        lines.append("    (the count includes recomputation: fused attention recomputes QK^T in the backward; "
                     "see docs/observability.md)")
        if self.is_main:
            tqdm.write("\n".join(lines))  # above the progress bar, not through it
        return result

    def close(self) -> None:
        if self._mode is not None:  # the run ended inside the counted step
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self.result is None and self._counted is not None:  # no step after the counted one
            c = self._counted
            self.result = self._report(c["record"], c["flops"], c["seconds"], timed_step=None,
                                       timed_flops=c["flops"], seconds=c["seconds"])
        if self.result is None:
            warn(f"--flop_counter: the run ended before step {self.start + 1}; nothing was counted")


__all__ = ["ModelFlops", "count_model_flops", "sdpa_flop_formulas", "flop_counter_mode", "FlopCounter",
           "synchronize"]
