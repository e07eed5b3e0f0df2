"""A random-init HF checkpoint without transformers, so a demo can pre-train from scratch."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..model.backbone import ModelConfig
from ..model.store import copy_tokenizer

MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
INIT_STD = 0.02  # transformers' initializer_range default for these architectures


def hf_config(config: dict) -> dict:
    """Complete a HF config dict: architectures <-> model_type, silu, fp32; checks it as
    Backbone would load it."""
    cfg = dict(config)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config is missing {missing}")
    if "architectures" not in cfg:
        by_type = {v: k for k, v in MODEL_TYPES.items()}
        if cfg.get("model_type") not in by_type:
            raise ValueError(f"config needs architectures or a model_type in {sorted(by_type)}")
        cfg["architectures"] = [by_type[cfg["model_type"]]]
    ModelConfig.from_hf(cfg)  # unsupported architectures / options are a ValueError here
    cfg.setdefault("model_type", MODEL_TYPES[cfg["architectures"][0]])
    cfg.setdefault("hidden_act", "silu")
    cfg.setdefault("initializer_range", INIT_STD)
    cfg["torch_dtype"] = "float32"
    return cfg


def init_checkpoint(out_dir: str, config: dict, seed: int = 0, tokenizer: Optional[str] = None) -> str:
    """Write config.json + model.safetensors of a random model (weights ~ N(0, 0.02) as HF
    initialises them, norms 1, biases 0) to out_dir; copy tokenizer files from `tokenizer`
    (a model directory) if given. Returns out_dir. Loadable by Backbone and transformers."""
    from safetensors.torch import save_file

    cfg = hf_config(config)
    shapes = ModelConfig.from_hf(cfg).tensor_shapes()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=g) * cfg["initializer_range"]
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)
    return out_dir
