"""Shared by the benchmark scripts: round-robin timing, device options and the machine description."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bsharedrag_fast.util.sysinfo import machine_info  # noqa: F401  (re-exported for the scripts)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _calibrate(fn, device: str) -> int:
    """Calls per batch so a batch lasts >= 1 ms: GPU launches queue up as in a model, and one
    sync per batch does not dominate small shapes."""
    for _ in range(2):
        fn()
    per_batch = 1
    while per_batch < 1024:
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        _sync(device)
        if time.perf_counter() - t0 >= 1e-3:
            break
        per_batch *= 2
    return per_batch


def time_methods(methods: dict, device: str, budget_s: float, with_min: bool = False) -> dict:
    """Median seconds per call of each method, measured round-robin (one batch of each per
    round) so that drift in machine load hits every method alike; with_min: {name: {"median",
    "min"}} instead."""
    batches = {name: _calibrate(fn, device) for name, fn in methods.items()}
    samples = {name: [] for name in methods}
    spent, rounds = 0.0, 0
    while rounds < 7 or (spent < budget_s * len(methods) and rounds < 100):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            for _ in range(batches[name]):
                fn()
            _sync(device)
            dt = time.perf_counter() - t0
            samples[name].append(dt / batches[name])
            spent += dt
        rounds += 1
    if with_min:
        return {name: {"median": statistics.median(v), "min": min(v)} for name, v in samples.items()}
    return {name: statistics.median(v) for name, v in samples.items()}


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: float32 on cpu, bfloat16 on cuda")


def device_dtype(ap: argparse.ArgumentParser, args) -> torch.dtype:
    """The benchmark dtype for --device / --dtype; --device cuda without a GPU is an error."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
