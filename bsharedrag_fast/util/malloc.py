"""Keep freed memory for reuse instead of handing it back to the OS at every free (glibc).

A prefill step of 2048 rows allocates and frees tensors of 5-25 MB in every layer (the
gate/up output, SiLU's, the MLP input). glibc serves blocks above its mmap threshold with a
fresh mmap and unmaps them on free (the threshold adapts upward only after such a free, and
only up to 32 MB), and returns the top of its heap above M_TRIM_THRESHOLD (128 KB) at free:
either way the next step faults every page back in, zeroed by the kernel. Measured on this
project's 2-vCPU VM, SmolLM2-135M embedding 64 texts of ~118 tokens: 300-470k minor page
faults and 0.9-1.5 s of system time per run, against 29-32k and 0.07-0.11 s with the settings
below (peak RSS within 2%). So at import, before anything big is allocated, the package sets
M_MMAP_THRESHOLD to 32 MB (glibc's largest) and M_TRIM_THRESHOLD to 1 GiB: freed blocks stay
in the heap and are reused (vLLM's CPU backend asks for tcmalloc for the same reason). The
engine hands them back after each large step (SharedRuntime.TRIM_ROWS): within a step they
are reused, across steps of other shapes they piled up.

oneDNN (torch's fp32 gemm for prefill and embedding rows on AVX-512, ops/linear.py) keeps the
last 1024 primitives it built, one per weight shape and row count: steps of ever new row counts
(embeddings, prefill chunks) filled it with memory that stays. `cap_onednn_cache` keeps the last
ONEDNN_CACHE (a step's 4-5 shapes for its last few row counts) unless the user set
ONEDNN_PRIMITIVE_CACHE_CAPACITY. Measured in one process running the peer bench's workloads 3
times (SmolLM2-135M, the Zen 4): peak RSS 1224 -> 1149 MB, resident after them 1020 -> 966 MB.

Left alone when the user chose: MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
MALLOC_TOP_PAD_ set, glibc.malloc tunables in GLIBC_TUNABLES, another allocator in
LD_PRELOAD (tcmalloc, jemalloc, mimalloc), or BSHAREDRAG_MALLOC=default. Standard library only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from typing import Optional

MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

POLICY = "not set"  # what configure() did, for machine_info and bench records
ONEDNN_CACHE = 32  # oneDNN primitives kept (its own default: 1024)
SET_VARIABLES: list = []  # the environment variables this module set (bench peers run without them)


@functools.cache
def libc() -> Optional[ctypes.CDLL]:
    """The C library (errno kept), looked up once: find_library runs ldconfig, ~4 ms a call,
    and the engine calls malloc_trim / madvise after its large steps. None where it has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _user_choice() -> str | None:
    env = os.environ
    if env.get("BSHAREDRAG_MALLOC") == "default":
        return "BSHAREDRAG_MALLOC=default"
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if var in env:
            return f"user {var}"
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "user GLIBC_TUNABLES"
    preload = env.get("LD_PRELOAD", "")
    for lib in ("tcmalloc", "jemalloc", "mimalloc"):
        if lib in preload:
            return f"LD_PRELOAD {lib}"
    return None


def configure() -> str:
    """Apply the settings above unless the user chose; returns (and keeps in POLICY) what was done."""
    global POLICY
    user = _user_choice()
    if user is not None:
        POLICY = f"left alone ({user})"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        POLICY = "left alone (not glibc)"
    else:
        try:
            c = libc()
            ok = c.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            ok = c.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        except AttributeError:  # (no C library: None has no mallopt)
            ok = False
        POLICY = (f"keep freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                  f"{TRIM_THRESHOLD >> 20} MiB)") if ok else "left alone (mallopt failed)"
    return POLICY


def cap_onednn_cache() -> None:
    """Cap oneDNN's primitive cache at ONEDNN_CACHE unless the user set its size (see the module
    doc); read by oneDNN when it builds its first primitive, so set at import. Noted in POLICY."""
    global POLICY
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        if var in os.environ:
            POLICY += f"; oneDNN primitive cache left alone (user {var})"
            return
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_CACHE)
    SET_VARIABLES.append("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    POLICY += f"; oneDNN primitive cache {ONEDNN_CACHE}"
