"""CPU threads: how many, and how they wait.

Every command takes `--threads N`; the default is the cores this process may run on
(`os.sched_getaffinity`, not `os.cpu_count()`: a container or `taskset` can give fewer).
torch's intra-op pool gets N threads, and our C++ kernels follow it (ops/_backends.py).

How idle OpenMP threads wait matters more than how many there are on a shared machine.
libgomp's default spins a thread for ~300k iterations at every barrier before it sleeps; when
other processes hold the cores, a spinning thread burns the time slice its descheduled peer
needs, and each parallel region waits for both. Measured on 2 Zen 4 vCPUs, one smollm2-135m
training step (bf16, 1024 tokens): quiet 2.9 s with spinning, 3.0 s passive; beside two busy
processes 10 s spinning, 5 s passive; beside another torch process (both spinning) 40-80 s.
Passive waiting costs a quiet machine's decode steps ~30% (4 x 64 tokens: 94-106 vs 66-77
tokens/s), so it is the default only where nobody chose: OMP_WAIT_POLICY is set to PASSIVE
when the package is imported before torch and the variable is unset (set it to ACTIVE to
spin). See docs/cli.md, "Threads".
"""
from __future__ import annotations

import os
from typing import Optional


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: Optional[int]) -> int:
    """Use `threads` CPU threads (None: available_cores()); returns the count set."""
    import torch

    n = available_cores() if threads is None else threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be an int >= 1, got {threads!r}")
    torch.set_num_threads(n)
    return n
