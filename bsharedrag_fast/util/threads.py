"""CPU threads: how many, and how they wait.

Every command takes `--threads N`; the default is the cores this process may run on
(`os.sched_getaffinity`, not `os.cpu_count()`: a container or `taskset` can give fewer).
torch's intra-op pool gets N threads, and our C++ kernels follow it (ops/_backends.py).

How idle OpenMP threads wait matters as much as how many there are. libgomp's default spins a
thread ~300k iterations at every barrier before it sleeps; when other processes hold the
cores, a spinning thread burns the time slice its descheduled peer needs, and each parallel
region waits for both. Sleeping (OMP_WAIT_POLICY=PASSIVE) has the opposite cost on a quiet
machine: every parallel region wakes a sleeping thread (on a VM, an idle vCPU the hypervisor
must wake), and a decode step has ~150 of them. Measured on 2 EPYC vCPUs (AVX2), smollm2-135m
fp32, one stream of 64 tokens / a 16 x 140-token prefill, seconds:
    quiet:                  spin 300k 2.81 / 4.26   spin 30k 2.68 / 3.90   passive 3.49 / 4.07
    beside two busy loops:  spin 300k 10.4 / 11.5   spin 30k 6.2 / 8.9     passive 4.0-6.5 / 6.8-7.5
and earlier, one smollm2-135m training step beside two busy processes: 10 s spinning, 5 s
passive; beside another spinning torch process 40-80 s. So `choose_wait_policy` looks before
torch loads libgomp (which reads the variables once): when the cores this process may use are
idle over a 50 ms look at /proc/stat, a short spin (GOMP_SPINCOUNT=SPIN_COUNT, enough to
bridge the gaps between one step's regions); otherwise, or where it cannot look, PASSIVE. A
user's OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins. See docs/cli.md, "Threads".
"""
from __future__ import annotations

import os
import time
from typing import Optional

SPIN_COUNT = 30000  # libgomp spin iterations at a barrier before sleeping, on an idle machine
IDLE_BELOW = 0.25  # busy cores (of those this process may use) under which the machine is idle
# what choose_wait_policy chose in this process, or "torch loaded first" (machine_info reports it)
WAIT_POLICY = "not chosen"


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


def _cpu_ticks(cpus: set) -> Optional[tuple[int, int]]:
    """(busy, total) clock ticks so far of these CPUs, from /proc/stat; None where unreadable.
    Busy counts steal: time a hypervisor gave to other guests is not ours to spin in."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                    continue
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


def busy_cores(interval: float = 0.05) -> Optional[float]:
    """How many of the CPUs this process may use were busy over the next `interval` seconds
    (other processes, or a hypervisor's other guests); None where /proc/stat cannot say."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return None
    before = _cpu_ticks(cpus)
    time.sleep(interval)
    after = _cpu_ticks(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_wait_policy(environ=None, busy: Optional[float] = -1.0) -> str:
    """Set how idle OpenMP threads wait (see the module doc): "user" (OMP_WAIT_POLICY or
    GOMP_SPINCOUNT was set), "spin" (idle cores: GOMP_SPINCOUNT=SPIN_COUNT) or "passive"
    (OMP_WAIT_POLICY=PASSIVE). Run before torch loads; busy: the busy cores measured
    (default: busy_cores() now; None: unknown)."""
    global WAIT_POLICY
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        choice = "user"
    else:
        busy = busy_cores() if busy == -1.0 else busy
        if busy is not None and busy < IDLE_BELOW:
            environ["GOMP_SPINCOUNT"], choice = str(SPIN_COUNT), "spin"
        else:
            environ["OMP_WAIT_POLICY"], choice = "PASSIVE", "passive"
    WAIT_POLICY = choice
    return choice


def wait_description() -> str:
    """How this process's idle OpenMP threads wait, as the benchmarks report it: WAIT_POLICY
    and the variables libgomp reads (e.g. "spin GOMP_SPINCOUNT=30000")."""
    chosen = [f" {k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return WAIT_POLICY + "".join(chosen)
