"""The summary of benchmarks/gpu_check.sh: every goal the GPU benchmarks checked, from their JSON
files in --dir, and each step's exit status, in one file: <dir>/gpu_check_<GPU>.json.

    python benchmarks/gpu_summary.py --gpu NAME --dir DIR [--seconds S] tests=0 lora_linear=0 ...
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

# step name -> the result file(s) it writes (relative to --dir; {gpu} is the GPU's name)
RESULTS = {
    "lora_linear": "lora_linear_cuda_{gpu}.json",
    "pool": "pool_cuda_{gpu}.json",
    "attention": "attention_cuda_{gpu}.json",
    "decode_graphs": "decode_graphs_cuda_{gpu}.json",
    "engine": "bench_tiny_cuda_{gpu}/bench.json",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", required=True, help="the GPU's name, as in the result file names")
    ap.add_argument("--dir", required=True, help="where gpu_check.sh wrote its results")
    ap.add_argument("--seconds", type=int, default=None, help="the check's wall time")
    ap.add_argument("steps", nargs="*", help="NAME=EXIT_STATUS of each step")
    args = ap.parse_args(argv)
    steps = {}
    for s in args.steps:
        name, _, rc = s.partition("=")
        steps[name] = int(rc) if rc.lstrip("-").isdigit() else rc
    goals, missing = [], []
    for step, pattern in RESULTS.items():
        path = os.path.join(args.dir, pattern.format(gpu=args.gpu))
        if not os.path.exists(path):
            if step in steps:
                missing.append(step)
            continue
        with open(path) as f:
            for g in json.load(f).get("goals", []):
                goals.append({"step": step, **g})
    tuned = sorted(glob.glob(os.path.join(args.dir, "tuned", "*.json")))
    res = {"gpu": args.gpu, "seconds": args.seconds, "steps": steps, "results_missing": missing, "goals": goals,
           "tuned_tables": [os.path.relpath(p, args.dir) for p in tuned],
           "all_steps_passed": all(rc == 0 for rc in steps.values()) and not missing,
           "all_goals_met": bool(goals) and all(g["met"] for g in goals)}
    out = os.path.join(args.dir, f"gpu_check_{args.gpu}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for g in goals:
        v = g["value"]
        print(f"[{g['step']}] {g['goal']}: {v:.3f}" if isinstance(v, float) else f"[{g['step']}] {g['goal']}: {v}",
              "-> met" if g["met"] else "-> NOT met")
    print(f"steps: {steps}; missing results: {missing or 'none'}; wrote {out}")
    return 0 if res["all_steps_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
