"""Model FLOPs utilisation: the accelerator's dense bf16 peak, and MFU from achieved TFLOP/s.

MFU = (analytic model FLOPs per step / step time, per GPU) / peak dense bf16 TFLOP/s of the GPU.
The analytic FLOPs are defined in observability/flops.py. Peaks are the datasheets' *dense* tensor-core
bf16 figures (datasheets print the 2:4-sparsity number, twice as large); they match torchtitan's
``get_peak_flops``. An unknown accelerator gets no MFU (TFLOP/s only) until --peak_tflops gives its peak;
on CPU there is no meaningful peak, so only TFLOP/s is reported unless --peak_tflops is set.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s). First match wins, so the more specific
# names come first. Names are matched case-insensitively.
PEAK_BF16_TFLOPS: Tuple[Tuple[str, float], ...] = (
    ("GH200", 989.0),        # Grace Hopper: an H100 SXM die
    ("H200", 989.0),         # H200 SXM (NVL: 835, but reported as "H200 NVL")
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),         # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),         # SXM and PCIe have the same tensor peak
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 125.0),         # AWS' A10 variant; its clocks are lower than the A10's. Prefer --peak_tflops.
    ("A10", 125.0),
    ("A6000", 155.0),        # RTX A6000
    ("A40", 150.0),
    ("MI300X", 1307.0),
    ("MI325X", 1307.0),
    ("MI250X", 383.0),
)


def lookup_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name:
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_tflops_for(device: torch.device, override: float = 0.0) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s or None, a line saying where it came from). ``override`` (--peak_tflops) wins."""
    name = device_name(device)
    if override:
        return float(override), f"MFU against --peak_tflops {override:g} TFLOP/s ({name})"
    if device.type != "cuda":
        return None, f"{name}: no accelerator peak known; reporting TFLOP/s without MFU (--peak_tflops sets one)"
    peak = lookup_peak_tflops(name)
    if peak is None:
        return None, (f"{name}: not in the peak table; reporting TFLOP/s without MFU (pass --peak_tflops with its "
                      f"dense bf16 peak)")
    return peak, f"MFU against {name}'s dense bf16 peak of {peak:g} TFLOP/s"


__all__ = ["PEAK_BF16_TFLOPS", "lookup_peak_tflops", "peak_tflops_for", "device_name"]
