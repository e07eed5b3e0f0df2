"""Resumable training checkpoints without pickle: tensors in safetensors, everything else JSON.

    out/checkpoints/step-N/
      state.safetensors        trainable weights (model/NAME) and AdamW's per-parameter
                               tensors (optim/INDEX/KEY)
      state.json               step, world size, the run's config, optimizer param groups,
                               scheduler, data-source position, loss history
      rng-RANK.safetensors     that rank's torch (and CUDA) generator states
      rng-RANK.json            that rank's numpy and python RNG states

A checkpoint is written to step-N.tmp and renamed, so an interrupted save never leaves a
half one. Loading reads safetensors and JSON only: nothing in a checkpoint directory can run
code (the pickle format of earlier versions, state.pt, is refused, not read). Resuming
checks the checkpoint against the run: world size, config (see RESUME_FREE) and the shapes
of the trainable weights; a mismatch is a one-line ValueError naming what differs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..util.jsonfile import read_json, write_json

STATE = "state"
# config fields a resumed run may change: where and how often it saves, the device; every
# other field shapes the run (data, schedule, model), so a checkpoint of another config is refused
RESUME_FREE = frozenset({"out", "save_every", "keep_checkpoints", "keep_finished_checkpoints", "resume", "device",
                         "activation_checkpointing"})


def _config_record(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (an incomplete checkpoint?)") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _rng_save(tmp: str, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, os.path.join(tmp, f"rng-{rank}.safetensors"))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    write_json(os.path.join(tmp, f"rng-{rank}.json"), {
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss_next": py_gauss}})


def _rng_load(path: str, rank: int) -> None:
    tensors = _read_tensors(os.path.join(path, f"rng-{rank}.safetensors"))
    where = os.path.join(path, f"rng-{rank}.json")
    rec = read_json(where, "checkpoint RNG states")
    try:
        n, p = rec["numpy"], rec["python"]
        np_state = (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        py_state = (p["version"], tuple(p["state"]), p["gauss_next"])
        torch_state = tensors["torch"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not an RNG state record ({type(e).__name__}: {e})") from None
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _split_optimizer(opt_state: dict) -> tuple[dict, dict]:
    """AdamW's state_dict as (tensors, JSON): per-parameter tensors by optim/INDEX/KEY."""
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, rec: dict) -> dict:
    state: dict = {}
    for name, t in tensors.items():
        if name.startswith("optim/"):
            _, idx, k = name.split("/", 2)
            state.setdefault(int(idx), {})[k] = t
    for idx, st in rec["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": rec["param_groups"]}


def save_checkpoint(root: str, step: int, cfg, model, opt, sched, source, history: list, dist) -> str:
    """Write step-`step` under root (every rank its RNG state, rank 0 the rest); returns its path."""
    final = os.path.join(root, f"step-{step}")
    tmp = final + ".tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    _rng_save(tmp, dist.rank)
    if dist.main:
        tensors = {f"model/{n}": p.detach().cpu().clone().contiguous() for n, p in model.trainable_parameters()}
        opt_tensors, opt_rec = _split_optimizer(opt.state_dict())
        tensors.update(opt_tensors)
        save_file(tensors, os.path.join(tmp, STATE + ".safetensors"))
        write_json(os.path.join(tmp, STATE + ".json"), {
            "step": step, "world": dist.world, "config": _config_record(cfg), "optimizer": opt_rec,
            "scheduler": sched.state_dict(), "data": source.state_dict(), "history": history})
    dist.barrier()
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def _config_diff(saved: dict, now: dict) -> str:
    keys = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if not keys:
        return ""
    first = keys[0]
    more = f" (and {len(keys) - 1} more: {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return f"{first}={saved.get(first)!r} there, {now.get(first)!r} in this run{more}"


def load_checkpoint(path: str, cfg, model, opt, sched, source, dist) -> tuple[int, list]:
    """Restore a checkpoint written by save_checkpoint into this run; returns (step, history).
    The record, the config and the weights' shapes are checked before anything is restored."""
    if not os.path.isfile(os.path.join(path, STATE + ".json")) and os.path.isfile(os.path.join(path, "state.pt")):
        raise ValueError(f"{path}: a checkpoint in the old pickle format (state.pt), which is never loaded because "
                         f"unpickling can run code; remove it, use another out, or resume=False")
    rec = read_json(os.path.join(path, STATE + ".json"), "checkpoint record")
    tensors = _read_tensors(os.path.join(path, STATE + ".safetensors"))
    try:
        step, world, saved_cfg = int(rec["step"]), rec["world"], rec["config"]
        opt_rec, sched_rec, data, history = rec["optimizer"], rec["scheduler"], rec["data"], rec["history"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}/{STATE}.json: not a checkpoint record ({type(e).__name__}: {e})") from None
    if world != dist.world:
        raise ValueError(f"checkpoint {path} was written by {world} processes, this run has {dist.world}")
    diff = _config_diff(saved_cfg, _config_record(cfg))
    if diff:
        raise ValueError(f"checkpoint {path} belongs to another run: {diff}; use another out or resume=False")
    named = dict(model.trainable_parameters())
    weights = {n[len("model/"):]: t for n, t in tensors.items() if n.startswith("model/")}
    if {n: tuple(t.shape) for n, t in weights.items()} != {n: tuple(p.shape) for n, p in named.items()}:
        raise ValueError(f"checkpoint {path} holds other trainable weights than this run's model "
                         f"(a different LoRA config or model?); use another out or resume=False")
    try:
        opt.load_state_dict(_join_optimizer(tensors, opt_rec))
        sched.load_state_dict(sched_rec)
        source.load_state_dict(data)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"checkpoint {path}: optimizer, scheduler or data state does not fit this run "
                         f"({type(e).__name__}: {e})") from None
    with torch.no_grad():
        for n, t in weights.items():
            named[n].copy_(t)
    _rng_load(path, dist.rank)
    return step, history
