"""How much memory a function needs at its peak: measured, on the CPU as on a GPU.

Naive attention materializes the T_q x T_k scores and probabilities (and
autograd keeps them for the backward), so its peak grows as T²;
FlashAttention's grows as T. To see it, count the bytes allocated above the
starting point while the function runs, and keep the largest value reached.

On CUDA, PyTorch's allocator tracks that peak itself
(``torch.cuda.max_memory_allocated``). On the CPU, the profiler with
``profile_memory=True`` records an event for every allocation (+bytes) and
every free (-bytes); their running sum in time order is the memory in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def _cpu_peak(prof: profile) -> int:
    """The largest running sum of the profiler's CPU memory events, bytes above the start (0 if nothing)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    in_use = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        in_use += e.nbytes()  # positive: allocated; negative: freed
        peak = max(peak, in_use)
    return peak


def peak_memory(
    fn: Callable[..., Any], *args: Any, device: str | torch.device = "cpu", **kwargs: Any
) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), peak_bytes)``: the most bytes allocated above the start while fn ran.

    ``device="cuda"`` reads CUDA's allocator statistics; the CPU is measured
    with the profiler, which slows fn down (every op is recorded). Memory fn
    frees before returning still counts toward the peak; tensors that were
    allocated before the call do not, and freeing one of them inside fn lowers
    the count (clear old gradients before measuring a backward pass).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    return result, _cpu_peak(prof)
