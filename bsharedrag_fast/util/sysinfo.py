"""What benchmarks record about where they ran: process memory (Linux /proc) and the machine."""
from __future__ import annotations

import os
import platform

import torch

from . import malloc, threads


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_kib_field(path: str, key: str) -> int:
    """Bytes of the `key:  N kB` line of a /proc file."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not found in {path}")


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far (VmHWM)."""
    return _proc_kib_field("/proc/self/status", "VmHWM")


def tree_peak_rss_bytes(pid: int) -> int:
    """Sum of VmHWM over process pid and its descendants (engines that fork workers, as vLLM
    does, hold their memory there); processes that end meanwhile count 0."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _proc_kib_field(f"/proc/{p}/status", "VmHWM")
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += map(int, f.read().split())
        except OSError:
            pass
    return total


def release_free_heap() -> None:
    """Give the heap pages malloc keeps after frees back to the OS (glibc's malloc_trim; a
    no-op elsewhere). Loading a checkpoint frees the copies it read and merged: smollm2-135m
    left 111 MB of such pages in the RSS (631 -> 520 MB over the baseline, weights 513 MB)."""
    trim = getattr(malloc.libc(), "malloc_trim", None)  # (None: not glibc)
    if trim is not None:
        trim(0)


def available_memory_bytes() -> int:
    """Memory the kernel says new work can use without swapping (MemAvailable)."""
    return _proc_kib_field("/proc/meminfo", "MemAvailable")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matmuls are
    ~3x fp32's (smollm2-135m forward: 500 -> 1500 tokens/s on 2 Zen 4 cores); elsewhere
    torch emulates them, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, p, lambda: False)() for p in probes)


def machine_info(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        # the vector units torch dispatches to (AVX2, AVX512, ...): the same "AMD EPYC" name
        # has come with and without AVX-512 / BF16 on our machines, and timings differ by 2-7x
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_has_bf16(),
        "omp_wait": threads.wait_description(),
        "malloc": malloc.POLICY,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        import triton

        info["triton"] = triton.__version__
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
