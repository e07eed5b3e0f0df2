"""Random checkpoints, adapters and token workloads for benchmarks (nothing is downloaded).

    cfg = write_checkpoint(dir, PRESETS["qwen2-0.5b"])          # HF layout, random weights
    write_adapter(os.path.join(dir, "retrieval"), cfg, seed=1)  # random PEFT LoRA (lora_B != 0)
    docs, prompts = token_workload(cfg["vocab_size"], docs=64, answers=8)

Presets copy the shapes of public models (no weights); checkpoints above one shard size are
written as shards with a model.safetensors.index.json, one layer at a time, so writing an 8B
checkpoint never holds it all in memory.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from ..model.adapters import MODULE_PARENT, TARGET_MODULES
from .presets import LLAMA, PRESETS, QWEN2  # noqa: F401  PRESETS re-exported (bench_step_overhead.py)

SHARD_BYTES = 2 << 30


def write_checkpoint(path: str, preset: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A random Qwen2 or Llama checkpoint in HF layout (config.json + safetensors); returns the
    config dict. Qwen2 presets get q/k/v biases. No eos_token_id: generation runs its full length."""
    arch = (preset.get("architectures") or ["Qwen2ForCausalLM"])[0]
    if arch not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        raise ValueError(f"write_checkpoint writes Qwen2ForCausalLM or LlamaForCausalLM, got {arch!r}")
    cfg = {**(QWEN2 if arch == "Qwen2ForCausalLM" else LLAMA), "hidden_act": "silu",
           "max_position_embeddings": 4096, **preset, "torch_dtype": str(dtype).removeprefix("torch.")}
    os.makedirs(path, exist_ok=True)
    _save_sharded(path, _layout(cfg), dtype, torch.Generator().manual_seed(seed))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return cfg


def _layout(cfg: dict) -> list:
    """The checkpoint's tensors as groups (embedding, each layer, tail) of {name: shape}."""
    d, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    groups = [{"model.embed_tokens.weight": (cfg["vocab_size"], d)}]
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        sd = {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
              p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
              p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
              p + "mlp.down_proj.weight": (d, inter)}
        if (cfg.get("architectures") or [""])[0] == "Qwen2ForCausalLM":
            sd.update({p + "self_attn.q_proj.bias": (d,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)})
        groups.append(sd)
    tail = {"model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        tail["lm_head.weight"] = (cfg["vocab_size"], d)
    groups.append(tail)
    return groups


def checkpoint_nbytes(cfg: dict, dtype: torch.dtype) -> int:
    """Bytes of a Qwen2 / Llama checkpoint of this config's shape in dtype (no adapters)."""
    esize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * esize for sd in _layout(cfg) for shape in sd.values())


def _save_sharded(path: str, groups: list, dtype: torch.dtype, g: torch.Generator) -> None:
    """Random tensors (norm weights 1, the rest N(0, 0.02)) for each group, written to shards of
    about SHARD_BYTES (one model.safetensors when it all fits); a shard's tensors are made only
    when it is written, so memory holds one shard at a time."""
    esize = torch.empty((), dtype=dtype).element_size()
    nbytes = {k: math.prod(shape) * esize for sd in groups for k, shape in sd.items()}  # per tensor, for shards
    shards, current = [], []
    for sd in groups:
        current.append(sd)
        if sum(nbytes[k] for grp in current for k in grp) >= SHARD_BYTES:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.ones(shape, dtype=dtype) if k.endswith("norm.weight")
                   else (torch.randn(shape, generator=g) * 0.02).to(dtype)
                   for grp in shard for k, shape in grp.items()}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=1)


def write_adapter(path: str, cfg: dict, seed: int, rank: int = 16, alpha: int = 32) -> None:
    """A random PEFT LoRA adapter on q/k/v/o/gate/up/down of every layer (lora_B non-zero, unlike
    peft's initialisation), in the checkpoint's torch_dtype."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    d, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or d // cfg["num_attention_heads"])
    q = cfg["num_attention_heads"] * (cfg.get("head_dim") or d // cfg["num_attention_heads"])
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    dtype = getattr(torch, cfg.get("torch_dtype") or "float32")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in range(n_layers):
        for name, (fin, fout) in shapes.items():
            blk = MODULE_PARENT[name]
            key = f"base_model.model.model.layers.{layer}.{blk}.{name}"
            sd[key + ".lora_A.weight"] = (torch.randn(rank, fin, generator=g) / fin**0.5).to(dtype)
            sd[key + ".lora_B.weight"] = (torch.randn(fout, rank, generator=g) * 0.01).to(dtype)
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                   "lora_dropout": 0.0, "target_modules": list(TARGET_MODULES), "bias": "none",
                   "base_model_name_or_path": None, "fan_in_fan_out": False, "use_rslora": False}, f)


def token_workload(vocab: int, docs: int, answers: int, seed: int = 0) -> tuple[list, list]:
    """Random token ids: `docs` documents of 16-64 tokens to embed and `answers` prompts of 32-128
    tokens to answer (ids from 3 up, clear of typical special tokens)."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 65, (docs,), generator=g)]
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(32, 129, (answers,), generator=g)]
    return doc_ids, prompts
