"""Putting the weights where FSDP2 shards them: each unit's dtype and device (UnitPlacer), the host pages a
moved weight leaves behind, and --low_cpu_fsdp's broadcast of rank 0's weights (with the buffers no state dict
holds)."""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from shardtune.configs import precision as P
from shardtune.models.quantization import is_quantized
from shardtune.utils import distributed


class UnitPlacer:
    """Gives each FSDP unit's parameters their stored dtype just before the unit is sharded.

    * Trainable parameters: the master dtype of the precision mode (fp32 for the mixed modes).
    * Frozen parameters under PEFT: the compute dtype (bf16 for bf16_mixed): a weight that never gets an
      update needs no fp32 master copy, and FSDP then neither stores nor all-gathers fp32 for it.
    * With a ``device``, parameters move there first, so a checkpoint read in its own dtype (bf16) is
      upcast on the GPU one unit at a time and the host never holds an fp32 copy of the whole model.
    * The host copy a parameter leaves behind gives its pages back at once (``release_host_pages``), so host
      memory holds about one unit's weights, not every moved unit whose checkpoint file is still mapped.
    """

    def __init__(self, precision: str, device: Optional[torch.device], frozen_in_compute_dtype: bool):
        self.master = P.master_dtype(precision)
        self.frozen = P.frozen_dtype(precision) if frozen_in_compute_dtype else self.master
        self.device = device

    def __call__(self, params) -> None:
        for p in params:
            if not p.is_floating_point() or is_quantized(p):  # packed 4-bit bytes: a cast would destroy them
                continue
            want = self.master if p.requires_grad else self.frozen
            if p.dtype != want or (self.device is not None and p.device != self.device):
                old = p.data
                p.data = old.to(device=self.device or p.device, dtype=want)
                release_host_pages(old)



_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None) if sys.platform.startswith("linux") else None



def release_host_pages(t: torch.Tensor) -> None:
    """Give the host pages of ``t``'s storage back to the OS now, if ``t`` (about to be dropped) is its only user.

    Why: from_pretrained leaves every weight in a view of its safetensors file, mapped into memory. A page
    counts in the process's RSS once it is read (the copy to the GPU reads them all), and a file's mapping goes
    away only when the last tensor read from it is freed. Moving unit after unit therefore kept every moved
    unit whose file still held an unmoved tensor: with the Llama-3.1-8B layout (4 files; the input embedding, in
    the first file, moves last with the root) most of the first file plus the file in progress, a peak of 40%
    of the model (measured on CPU at that layout with 2.3B parameters; 8.3 GB per rank at 8B on GPUs).
    MADV_DONTNEED drops the storage's pages from this process only (the page cache that the other ranks map
    stays); only whole pages inside the storage, and only when no other tensor shares the storage (a view,
    --low_cpu_fsdp's state dict), so nothing still in use can lose its contents. Linux only; a no-op elsewhere
    or where torch cannot tell the storage's users.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if _MADV_DONTNEED is None or use_count is None or t.device.type != "cpu":
        return
    storage = t.untyped_storage()
    if use_count(storage._cdata) > 2:  # users: t and the handle `storage`
        return
    page = mmap.PAGESIZE
    start = -(-storage.data_ptr() // page) * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)



def load_full_state_from_rank0(model: nn.Module, full_state: dict) -> None:
    """Fill a sharded model with rank 0's full state dict (other ranks pass {}), then rebuild the
    buffers that are in no state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    restore_non_persistent_buffers(model)



def restore_non_persistent_buffers(model: nn.Module) -> None:
    """Recompute buffers that no state dict holds (``persistent=False``) after a meta-device build.

    Rotary-embedding modules are rebuilt from their config (whatever the RoPE variant: the model's own
    constructor computes it) and their buffers copied; any other non-persistent buffer is broadcast
    from rank 0, which built the model for real. Every rank makes the same calls in the same order.
    """
    for module in model.modules():
        names = [n for n in getattr(module, "_non_persistent_buffers_set", ()) if module._buffers.get(n) is not None]
        if not names:
            continue
        fresh = _rebuild_rotary(module)
        for name in sorted(names):
            buf = module._buffers[name]
            if fresh is not None and isinstance(fresh._buffers.get(name), torch.Tensor):
                with torch.no_grad():
                    buf.copy_(fresh._buffers[name].to(device=buf.device, dtype=buf.dtype))
            elif distributed.group_up():
                dist.broadcast(buf, src=0)



def _rebuild_rotary(module: nn.Module) -> Optional[nn.Module]:
    if "Rotary" not in type(module).__name__ or not hasattr(module, "config"):
        return None
    try:
        with torch.device("cpu"):
            return type(module)(module.config)
    except Exception:  # noqa: BLE001 - an unusual constructor: fall back to the broadcast
        return None
