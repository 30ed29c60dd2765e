"""Timing helpers shared by the benchmarks: median milliseconds, copy bandwidth, the machine."""

from __future__ import annotations

import platform
import time

import numpy as np
import torch
import triton

def median_ms(fn, device: str, reps: int = 10, warmup: int = 3, setup=None, calls: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` samples after ``warmup`` calls. ``setup()``
    runs before each sample, outside the timed region (CUDA: events recorded around ``fn`` only;
    CPU: ``time.perf_counter``). ``calls`` > 1: a sample is that many calls back to back, divided
    by ``calls``: on CUDA the host's dispatch of the next call then overlaps the GPU's work on the
    previous one, as in a training step, so a kernel that runs longer than its dispatch is timed
    by its throughput, not by its launch latency."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            start_s = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start_s) * 1e3 / calls)
    return float(np.median(times))


def copy_bandwidth(device: str, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy ``dst.copy_(src)`` of ``nbytes``: GB/s counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * nbytes / ms / 1e6


def host_op_us(device: str, calls: int = 2000) -> float:
    """The host's time to issue one small aten op (``torch.add`` of 16 floats on ``device``), µs,
    the median of 5 runs of ``calls`` back to back: how fast this host issues work. A step that is
    host-bound (fxrec's) runs slower on a host where this is larger, against a GPU-bound one."""
    x = torch.zeros(16, device=device)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            torch.add(x, 1)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return float(np.median(runs))


def machine(device: str) -> str:
    """The card (or CPU and threads) and the torch / triton versions."""
    if torch.device(device).type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{where} (torch {torch.__version__}, triton {triton.__version__})"
