"""Measure launch configs of the LoRA shrink / expand and pool Triton kernels on this GPU and write the
table kernels/tuning.py reads (kernels/tuned/<gpu slug>.json), which overrides the kernels' heuristics
per shape bucket.

For every shape bucket below, the heuristic's config and a few candidates around it (one launch
parameter changed at a time, then the best change of each parameter together; --max-candidates in
all) are checked against a torch reference (a wrong or failing candidate is dropped) and timed with
triton.testing.do_bench (median, L2 flushed between calls). A key gets a table entry when its best
config beats the heuristic by --min-gain; the heuristic's and the best time of every measured key
are recorded under "measured". The table is rewritten after every key, so a run cut short by
--budget (the keys left are skipped, and counted) or by a timeout keeps what it measured.

    python benchmarks/tune_kernels.py --device cuda --out kernels/tuned/   # about --budget seconds
    python benchmarks/tune_kernels.py --device cpu --smoke --out /tmp/t/  # the code path, interpreted

Shapes, in order of priority (the ops take turns, so a short budget still covers each of them):
SmolLM2-135M (d 576: shrink K 576 / 1536, expand N 960 / 576 / 3072) then a Llama-8B-like model
(d 4096), ranks 16 / 8 / 64, max_count buckets 1 ... 4096, 1 and 4 adapters; pool with d 576 / 4096,
batches 1-256 (last) and 256-65536 packed tokens (mean). The dtype is the engine's (bf16 on CUDA).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from bsharedrag_fast.util.pool_modes import POOL_MODES

from _common import add_device_args, device_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("shrink", "expand", "pool_rows", "pool_mean")
MODELS = {  # name: (shrink K, expand N): every LoRA'd projection's in / out features
    "smollm2": ((576, 1536), (960, 576, 3072)),
    "llama8b": ((4096,), (4096,)),
}
RANKS = (16, 8, 64)
COUNTS = (1, 4, 16, 64, 256, 1024, 4096)  # the max_count buckets (tuning.bucket)
ADAPTERS = (1, 4)
POOL_DIMS = (576, 4096)
POOL_BATCHES = (1, 16, 64, 256)
POOL_TOKENS = (256, 4096, 16384, 65536)
MEAN_SEQ_LEN = 128  # mean pooling: sequences of this length make up the packed tokens
LAST_SEQ_LEN = 8  # last pooling reads one row per sequence: the length hardly matters
SMOKE = dict(models={"tiny": ((48,), (40,))}, ranks=(8,), counts=(1, 16), adapters=(2,), pool_dims=(64,),
             pool_batches=(4,), pool_tokens=(300,), max_candidates=3)
BENCH_WARMUP_MS, BENCH_REP_MS = 5, 20
EPS = 1e-6
TOLS = {  # output vs the fp32 torch reference (about the kernel tests' tolerances)
    "shrink": {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3},
    "expand": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2},
    "pool": {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
}


@dataclass
class Case:
    """One key's tensors: run launches through the kernel's own wrapper (its config from the table in
    force), check runs it on fresh outputs and compares with the reference; base is the heuristic's
    entry and axes the values tried for each launch parameter."""

    run: Callable[[], None]
    check: Callable[[], bool]
    base: dict
    axes: dict


@dataclass
class Job:
    op: str
    key: tuple
    label: str
    make: Callable[[], Case]  # tensors are made only when the key is measured


def _kernel_modules() -> SimpleNamespace:
    """The kernels package's modules: installed (bsharedrag_fast.kernels) or, as the tests do, the
    source tree's. Imported late: --device cpu must set TRITON_INTERPRET before triton loads."""
    try:
        pkg = importlib.import_module("bsharedrag_fast.kernels").__name__
    except ImportError:
        sys.path.insert(0, ROOT)
        pkg = "kernels"
    names = ("tuning", "lora_shrink", "lora_expand", "pool")
    return SimpleNamespace(**{n: importlib.import_module(f"{pkg}.{n}") for n in names})


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    return bool(torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol))


def _around(value: int, lo: int, hi: int) -> list:
    """value halved and doubled, within [lo, hi]."""
    return [v for v in (value // 2, value * 2) if lo <= v <= hi]


# ----------------------------------------------------------------------------- cases


def _segments(n_ad: int, count: int, device: str) -> tuple:
    """LoRAMeta-style metadata: n_ad adapters of count rows each, rows already grouped."""
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.arange(n_ad * count, **i32), torch.arange(n_ad, **i32) * count,
            torch.full((n_ad,), count, **i32), torch.arange(n_ad, **i32))  # fmt: skip


def shrink_case(km, count, n_ad, K, R, dtype, device) -> Case:
    g = torch.Generator().manual_seed(K + R)
    x = torch.randn(n_ad * count, K, generator=g).to(device, dtype)
    a = (torch.randn(n_ad, R, K, generator=g) / K**0.5).to(device, dtype)
    ref = torch.einsum("amk,ark->amr", x.float().view(n_ad, count, K), a.float()).reshape(-1, R)
    meta = _segments(n_ad, count, device)
    v = torch.empty(n_ad * count, R, dtype=torch.float32, device=device)

    def run():
        km.lora_shrink.lora_shrink(x, a, *meta, count, v)

    def check():
        v.fill_(float("nan"))  # every element must be written
        run()
        return _close(v, ref, TOLS["shrink"][dtype])

    mod = km.lora_shrink
    with km.tuning.using(None):
        cfg = mod.shrink_config(count, n_ad, K, R, x.element_size(), mod.num_sms(x.device), device=x.device)
    base = {f: cfg[f] for f in km.tuning.spec("shrink")[1]}
    axes = dict(BLOCK_M=_around(base["BLOCK_M"], 16, 128),
                BLOCK_K=_around(base["BLOCK_K"], 16, mod.pow2_block(K, 16, 512)),
                # no more splits than K blocks: the extra programs would add nothing
                SPLIT_K=_around(base["SPLIT_K"], 1, min(mod.MAX_SPLIT_K, -(-K // base["BLOCK_K"]))),
                num_warps=[4, 8], num_stages=[2, 3, 4])  # fmt: skip
    return Case(run, check, base, axes)


def expand_case(km, count, n_ad, N, R, dtype, device) -> Case:
    g = torch.Generator().manual_seed(N + R)
    v = torch.randn(n_ad * count, R, generator=g).to(device)
    b = (torch.randn(n_ad, N, R, generator=g) / R**0.5).to(device, dtype)
    scaling = (torch.rand(n_ad, generator=g) + 0.5).to(device)
    y0 = torch.randn(n_ad * count, N, generator=g).to(device, dtype)
    delta = torch.einsum("amr,anr->amn", v.view(n_ad, count, R), b.float()) * scaling[:, None, None]
    ref = y0.float() + delta.reshape(-1, N)
    meta = _segments(n_ad, count, device)
    y = y0.clone()

    def run():  # in place: timing runs keep adding into y, which only the check reads afresh
        km.lora_expand.lora_expand(v, b, scaling, *meta, count, y)

    def check():
        y.copy_(y0)
        run()
        return _close(y, ref, TOLS["expand"][dtype])

    mod = km.lora_expand
    with km.tuning.using(None):
        cfg = mod.expand_config(count, n_ad, N, R, b.element_size(), mod.num_sms(y.device), device=y.device)
    base = {f: cfg[f] for f in km.tuning.spec("expand")[1]}
    axes = dict(BLOCK_M=_around(base["BLOCK_M"], 16, 128),
                BLOCK_N=_around(base["BLOCK_N"], 16, km.lora_shrink.pow2_block(N, 16, 256)),
                num_warps=[4, 8], num_stages=[1, 2, 3])  # fmt: skip
    return Case(run, check, base, axes)


def _pool_reference(hidden, cu, w, mode) -> torch.Tensor:
    """fp32 torch: RMSNorm (every token for mean), pool, L2."""
    h = hidden.float()
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS)  # noqa: E731
    if mode == "last":
        v = rms(h[cu[1:].long() - 1])
    else:
        lens = (cu[1:] - cu[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=h.device), lens)
        v = torch.zeros(lens.shape[0], h.shape[1], device=h.device).index_add_(0, seq, rms(h)) / lens[:, None]
    return torch.nn.functional.normalize(v * w.float(), dim=-1)


def pool_case(km, op, d, size, dtype, device) -> Case:
    """op pool_rows: size sequences pooled by their last row; pool_mean: size packed tokens, mean."""
    mode = "last" if op == "pool_rows" else "mean"
    if mode == "last":
        lens = [LAST_SEQ_LEN] * size
    else:
        lens = [MEAN_SEQ_LEN] * (size // MEAN_SEQ_LEN) or [size]
        lens[-1] += size - sum(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    g = torch.Generator().manual_seed(d + size)
    hidden = torch.randn(int(cu[-1]), d, generator=g).to(device, dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(device, dtype)
    ref = _pool_reference(hidden, cu, w, mode)
    out = torch.empty(len(lens), d, dtype=dtype, device=device)

    def run():
        km.pool.pool_forward(hidden, cu, POOL_MODES[mode], w, EPS, True, out)

    def check():
        out.fill_(float("nan"))
        run()
        return _close(out, ref, TOLS["pool"][dtype])

    with km.tuning.using(None):
        cfg = km.pool.pool_config(d, B=len(lens), T=hidden.shape[0], elem_size=hidden.element_size(),
                                  device=hidden.device)  # fmt: skip
    block_d = cfg["rows"]["BLOCK_D"]
    if op == "pool_rows":
        base = {f: cfg["rows"][f] for f in km.tuning.spec(op)[1]}
        # register tiles up to 4x the heuristic's largest
        axes = dict(BLOCK_B=_around(base["BLOCK_B"], 1, min(64, max(1, 16384 // block_d))),
                    num_warps=_around(base["num_warps"], 1, 16))  # fmt: skip
    else:
        base = dict(cfg["mean"], programs_per_sm=cfg["programs_per_sm"])
        base = {f: base[f] for f in km.tuning.spec(op)[1]}
        axes = dict(BLOCK_T=_around(base["BLOCK_T"], 1, min(128, max(1, 32768 // block_d))),
                    num_warps=_around(base["num_warps"], 1, 16),
                    programs_per_sm=_around(base["programs_per_sm"], 1, 64))  # fmt: skip
    return Case(run, check, base, axes)


# ----------------------------------------------------------------------------- jobs


def make_jobs(km, ops, shapes, dtype, device) -> list:
    """Every key to measure, most important first within each op; the ops take turns."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_op = {op: [] for op in OPS}  # cheap: a job makes its tensors only when it runs
    for model, (ks, ns) in shapes["models"].items():
        for count, n_ad, R in itertools.product(shapes["counts"], shapes["adapters"], shapes["ranks"]):
            for K in ks:
                per_op["shrink"].append(Job(
                    "shrink", km.lora_shrink.shrink_key(count, n_ad, K, R, elem),
                    f"{model} K={K} R={R} max_count={count} adapters={n_ad}",
                    lambda c=count, a=n_ad, k=K, r=R: shrink_case(km, c, a, k, r, dtype, device)))  # fmt: skip
            for N in ns:
                per_op["expand"].append(Job(
                    "expand", km.lora_expand.expand_key(count, n_ad, N, R, elem),
                    f"{model} N={N} R={R} max_count={count} adapters={n_ad}",
                    lambda c=count, a=n_ad, n=N, r=R: expand_case(km, c, a, n, r, dtype, device)))  # fmt: skip
    for d in shapes["pool_dims"]:
        for B in shapes["pool_batches"]:
            per_op["pool_rows"].append(Job(
                "pool_rows", km.pool.pool_rows_key(d, B, elem), f"d={d} B={B} last",
                lambda d=d, B=B: pool_case(km, "pool_rows", d, B, dtype, device)))  # fmt: skip
        for T in shapes["pool_tokens"]:
            per_op["pool_mean"].append(Job(
                "pool_mean", km.pool.pool_mean_key(d, T, elem), f"d={d} T={T} mean",
                lambda d=d, T=T: pool_case(km, "pool_mean", d, T, dtype, device)))  # fmt: skip
    lists = [per_op[op] for op in ops]
    return [job for group in itertools.zip_longest(*lists) for job in group if job is not None]


# ----------------------------------------------------------------------------- search


def _timer(device: str) -> Callable:
    if device == "cuda":
        import triton.testing  # like every triton import here: after main() settles TRITON_INTERPRET

        return lambda fn: triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS,
                                                  return_mode="median") * 1e3  # fmt: skip

    def interpreted(fn):  # the Triton interpreter: a number for the code path, not a timing
        samples = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)

    return interpreted


def tune_key(km, job: Job, gpu: str, timer: Callable, max_candidates: int) -> dict:
    """Times the heuristic and up to max_candidates - 1 candidates for one key. Returns
    {"heuristic_us", "best_us", "best" (the fastest entry: the heuristic's own when it won),
    "heuristic_won", "tried", "dropped"}."""
    tuning = km.tuning
    case = job.make()
    key = tuning.key_string(job.key)

    def measure(entry):  # None: no table (the heuristic); an entry: a table holding just it
        table = None if entry is None else tuning.Table(tuning.make_table(gpu, {job.op: {key: entry}}))
        with tuning.using(table):
            try:
                ok = case.check()
            except Exception as e:  # e.g. a config the compiler cannot fit in shared memory
                print(f"    dropped {entry}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                return None
            if not ok:
                print(f"    dropped {entry}: wrong result")
                return None
            return timer(case.run)

    heuristic_us = measure(None)
    if heuristic_us is None:
        raise RuntimeError(f"{job.op} {key}: the heuristic's config {case.base} fails its check")
    tried = [(heuristic_us, case.base)]
    dropped = 0
    variants = [dict(case.base, **{name: v}) for name, values in case.axes.items() for v in values
                if v != case.base[name]]  # fmt: skip
    for entry in variants[: max_candidates - 1]:
        us = measure(entry)
        if us is None:
            dropped += 1
        else:
            tried.append((us, entry))
    # the winning change of each parameter, all together
    combo = dict(case.base)
    for name in case.axes:
        us, entry = min((t for t in tried if all(t[1][f] == case.base[f] for f in case.base if f != name)),
                        key=lambda t: t[0])  # fmt: skip
        combo[name] = entry[name]
    if len(tried) + dropped < max_candidates and all(combo != entry for _, entry in tried):
        us = measure(combo)
        if us is None:
            dropped += 1
        else:
            tried.append((us, combo))
    best_us, best = min(tried, key=lambda t: t[0])
    return {"heuristic_us": heuristic_us, "best_us": best_us, "best": best, "heuristic_won": best is case.base,
            "tried": len(tried) + dropped, "dropped": dropped}


def _out_path(out: str | None, gpu_slug: str) -> str:
    if out and out.endswith(".json"):
        return out
    return os.path.join(out or os.path.join(ROOT, "kernels", "tuned"), f"{gpu_slug}.json")


def _write(path: str, table: dict) -> None:
    # one line per entry, so that a committed table reads (and diffs) key by key
    text = re.sub(r"\{([^{}]*)\}", lambda m: "{" + " ".join(m.group(1).split()) + "}", json.dumps(table, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)  # a run killed mid-write keeps the previous table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap)
    ap.add_argument("--out", default=None,
                    help="a directory (the table is <dir>/<gpu slug>.json) or a .json path; default kernels/tuned/")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds for the whole run (default 120); the keys left when it is spent are skipped")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--max-candidates", type=int, default=12,
                    help="configs timed per key, the heuristic's included (default 12)")
    ap.add_argument("--min-gain", type=float, default=0.05,
                    help="a key gets an entry when its best config is this fraction faster than the heuristic")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, 3 configs a key, an entry for every key: checks the code path end to end "
                         "(what --device cpu runs, on the Triton interpreter; its timings mean nothing)")
    args = ap.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if not ops or any(op not in OPS for op in ops):
        ap.error(f"--ops: choose from {', '.join(OPS)}")
    if args.max_candidates < 1 or not 0 <= args.min_gain < 1:
        ap.error("--max-candidates must be >= 1 and --min-gain in [0, 1)")
    if args.device == "cpu":
        if not args.smoke:
            ap.error("--device cpu runs the Triton interpreter: only with --smoke (tiny shapes)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = device_dtype(ap, args)
    km = _kernel_modules()
    import triton  # after TRITON_INTERPRET is set (above), like the kernels
    tuning = km.tuning
    shapes = dict(models=MODELS, ranks=RANKS, counts=COUNTS, adapters=ADAPTERS, pool_dims=POOL_DIMS,
                  pool_batches=POOL_BATCHES, pool_tokens=POOL_TOKENS, max_candidates=args.max_candidates)
    if args.smoke:
        shapes.update(SMOKE)
    if args.device == "cuda":
        gpu = torch.cuda.get_device_name()
        note = f"measured with triton.testing.do_bench (median), {dtype}"
    else:
        gpu = "cpu (Triton interpreter)"
        note = "smoke run on the Triton interpreter: the timings are meaningless, the table checks the code path"
        print(f"note: {note}")
    path = _out_path(args.out, tuning.gpu_slug(gpu))
    jobs = make_jobs(km, ops, shapes, dtype, args.device)
    timer = _timer(args.device)
    entries, measured = {op: {} for op in ops}, {op: {} for op in ops}
    print(f"{gpu}, triton {triton.__version__}, {dtype}: {len(jobs)} keys, budget {args.budget:.0f} s -> {path}")
    t0 = time.monotonic()
    done = 0
    for i, job in enumerate(jobs, 1):
        if time.monotonic() - t0 > args.budget:
            break
        res = tune_key(km, job, gpu, timer, shapes["max_candidates"])
        key = tuning.key_string(job.key)
        gain = res["heuristic_us"] / res["best_us"]
        # --smoke: every key gets an entry (its timings mean nothing), so the table exercises every lookup
        take = args.smoke or (not res["heuristic_won"] and res["best_us"] <= res["heuristic_us"] * (1 - args.min_gain))
        if take:
            entries[job.op][key] = res["best"]
        measured[job.op][key] = dict(heuristic_us=round(res["heuristic_us"], 2), best_us=round(res["best_us"], 2),
                                     tried=res["tried"], dropped=res["dropped"], entry=take)  # fmt: skip
        done = i
        print(f"[{i}/{len(jobs)} {time.monotonic() - t0:.0f}s] {job.op} {key} ({job.label}): heuristic"
              f" {res['heuristic_us']:.1f} us, best {res['best_us']:.1f} us ({gain:.2f}x)"
              f"{' -> ' + json.dumps(entries[job.op][key]) if take else ''}", flush=True)
        _write(path, tuning.make_table(gpu, entries, note=note, measured=measured,
                                       skipped_keys=len(jobs) - done))  # fmt: skip
    skipped = len(jobs) - done
    if skipped:
        print(f"budget of {args.budget:.0f} s spent: skipped {skipped} of {len(jobs)} keys, from "
              f"{jobs[done].op} {jobs[done].label}")
    for op in ops:
        rows = measured[op].values()
        if rows:
            geo = math.exp(statistics.fmean(math.log(r["heuristic_us"] / r["best_us"]) for r in rows))
            print(f"{op}: {len(rows)} keys measured, {len(entries[op])} entries; heuristic / best,"
                  f" geometric mean {geo:.3f}x")
    _write(path, tuning.make_table(gpu, entries, note=note, measured=measured, skipped_keys=skipped))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
