"""The backbone: a Llama / Qwen2 / Mistral decoder over packed variable-length sequences,
one nn.Module for serving and training.

gpt-fast / nanoGPT style, one file top to bottom: config, HF checkpoint loading, RoPE,
the decoder layer, the model. The base is loaded frozen and shared by every adapter;
training unfreezes it (continual pre-training) or adds one trainable LoRA, and autograd
runs through the very layers and ops the engine runs.

Batch layout (no padding anywhere): B sequences are packed into `input_ids [T]`, and
`cu_seqlens int32 [B + 1]` holds their offsets (sequence b is rows cu[b]:cu[b+1]).
Everything else about a batch (each row's position, the LoRA metadata, the attention plan:
packed self-attention, or the paged KV cache of an engine step) is built once into a
`ForwardContext` before the model runs, by `hidden` or by the engine (engine/step.py);
`compute(input_ids, ctx)` only computes. The model never touches the KV cache's bookkeeping.

Per layer the projections are merged: q/k/v are one weight `[q; k; v]` (and one bias for
Qwen2) and gate/up are one weight `[gate; up]`, so the base is one `ops.linear` each (on
CPU, decode steps' few rows go to a C++ kernel that reads each weight once; see ops/linear.py).
The engine's adapters on a merged projection are one ops.MergedLoRA: one shrink over the
modules' stacked A's and one expand writing each module's columns, in place (see LoRAStack
and Backbone.set_lora_stacks). Attention: attention.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops import _backends
from ..ops.linear import cpp_pays
from ..ops.lora_meta import LoRAMeta
from ..util.jsonfile import read_json, write_json
from ..util.mapped import mapped_zeros
from ..util.sysinfo import release_free_heap
from . import adapters as peft_adapters
from .adapters import TARGET_MODULES, LayerLoRA, LoRAStack, ResidentAdapters
from .attention import AttentionPlan
from .store import copy_tokenizer, resolve_model

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
IGNORE = -100  # label of rows that carry no loss (as torch's cross_entropy ignore_index)
# "auto": engine steps the C++ decoder stack can run (ops.DecoderStack: CPU, inference, cached
# rows only, no adapter rows, few rows) run every layer in one call; "off": always op by op.
FUSED_LAYERS = "auto"
SCALE_SUFFIX = "_scale"  # an int8 weight's per-row scales (load_state_dict with dtype torch.int8)

# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # None (plain RoPE) or a llama3 dict
    attention_bias: bool = False  # bias on q/k/v (Qwen2: always; Llama: also on o_proj)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: Optional[int] = None  # Mistral: keys with q_pos - k_pos >= window are masked
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict, repr=False)  # bos/eos ids etc., informational

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a HF config.json dict (transformers 4.x `rope_theta` + `rope_scaling` or
        5.x `rope_parameters`). Unknown architectures and unsupported features are errors."""
        archs = cfg.get("architectures") or []
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {archs!r} in config.json; supported: {list(ARCHITECTURES)}")
        arch = archs[0]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _config_int(cfg, key)
        heads = cfg["num_attention_heads"]
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            if cfg.get(key) is not None:
                _config_int(cfg, key)
        if heads % (cfg.get("num_key_value_heads") or heads):
            raise ValueError(f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                             f"({cfg['num_key_value_heads']})")
        if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
            raise ValueError(f"config.json: hidden_size ({cfg['hidden_size']}) is not a multiple of "
                             f"num_attention_heads ({heads}) and no head_dim is given")
        eps = cfg.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"config.json: rms_norm_eps must be a number in (0, 1), got {eps!r}")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("unsupported rope partial_rotary_factor != 1.0")
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = {
                "rope_type": "llama3",
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }
        else:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, llama3)")
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = cfg.get("sliding_window")
        elif arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window", False):
            raise ValueError("Qwen2 use_sliding_window=True is not supported")
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif arch == "LlamaForCausalLM":
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False))
        else:
            qkv_bias = o_bias = mlp_bias = False
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=int(sliding) if sliding else None,
            architecture=arch,
            extra={k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF checkpoint names -> shapes this config expects (lm_head only when untied)."""
        d, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        s = {"model.embed_tokens.weight": (self.vocab_size, d), "model.norm.weight": (d,)}
        if not self.tie_word_embeddings:
            s["lm_head.weight"] = (self.vocab_size, d)
        for l in range(n):
            p = f"model.layers.{l}."
            s[p + "input_layernorm.weight"] = (d,)
            s[p + "post_attention_layernorm.weight"] = (d,)
            for name, out in (("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)):
                s[p + f"self_attn.{name}.weight"] = (out, d)
                if self.attention_bias:
                    s[p + f"self_attn.{name}.bias"] = (out,)
            s[p + "self_attn.o_proj.weight"] = (d, self.q_size)
            if self.o_proj_bias:
                s[p + "self_attn.o_proj.bias"] = (d,)
            s[p + "mlp.gate_proj.weight"] = (i, d)
            s[p + "mlp.up_proj.weight"] = (i, d)
            s[p + "mlp.down_proj.weight"] = (d, i)
            if self.mlp_bias:
                s[p + "mlp.gate_proj.bias"] = (i,)
                s[p + "mlp.up_proj.bias"] = (i,)
                s[p + "mlp.down_proj.bias"] = (d,)
        return s


def _config_int(cfg: dict, key: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config.json: {key} must be an int >= 1, got {v!r}")
    return v


# ----------------------------------------------------------------------------- checkpoint


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" object")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    if os.path.isfile(single):
        return [single]
    if any(n.endswith(".bin") for n in os.listdir(path)):
        raise ValueError(f"{path} holds only pickle (.bin) weights; convert them to safetensors")
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_state_dict(path: str, cfg: ModelConfig, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Read the expected tensors (through safe_open memory maps, no pickle) into copies of dtype.
    Missing, unexpected or mis-shaped tensors are a ValueError naming them.

    On CPU the copies are views of one buffer on huge pages (util.mapped: a decode step streams
    every weight, and 2 MiB pages stream faster), laid out so that each layer's q, k, v and its
    gate, up lie back to back: Layer merges them as views, without a copy (see _merged).
    dtype torch.int8 (CPU): weight-only int8, each matrix quantized as it is read (ops.linear's
    quantize_int8) with its per-row scales under NAME + SCALE_SUFFIX; the rest float32."""
    from safetensors import safe_open

    expected = cfg.tensor_shapes()
    int8 = dtype == torch.int8
    if int8 and device.type != "cpu":
        raise ValueError(f"int8 weights run on CPU only, not {device}")
    dtypes = {k: torch.int8 if int8 and len(shape) == 2 else (torch.float32 if int8 else dtype)
              for k, shape in expected.items()}
    arena = _weight_arena(expected, dtypes) if device.type == "cpu" else None
    sd: dict[str, torch.Tensor] = {}
    unexpected, bad = [], {}
    for fname in _safetensors_files(path):
        try:
            with safe_open(fname, framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types on a corrupt header
            raise ValueError(f"{fname}: not a readable safetensors file ({' '.join(str(e).split())})") from None
        for key in keys:
            if key in expected:
                # One memory map per tensor, copied out: pages read through a map stay in the
                # RSS while it is open, so a map held across the file doubled the load peak,
                # and a tensor left on it kept every page read (the sources of the merged
                # weights too) resident for good. Measured at qwen2-0.5b (one 2 GB file):
                # resident 2.9 -> 2.0 GB, load peak 3.8 -> 1.9 GB.
                with safe_open(fname, framework="pt", device="cpu") as f:
                    t = f.get_tensor(key)
                    if tuple(t.shape) != expected[key]:
                        bad[key] = f"{key}: {tuple(t.shape)} != {expected[key]}"
                    elif dtypes[key] == torch.int8:
                        q, sd[key + SCALE_SUFFIX] = ops.quantize_int8(t)
                        sd[key] = arena[key].copy_(q)
                    elif arena is not None:
                        sd[key] = arena[key].copy_(t)
                    else:
                        sd[key] = t.to(device=device, dtype=dtype, copy=True)
            elif key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_word_embeddings):
                continue  # recomputed / tied to the embedding
            else:
                unexpected.append(key)
    missing = sorted(set(expected) - set(sd) - set(bad))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config ({cfg.architecture}): "
            f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected tensors {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    if bad:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {list(bad.values())[:10]}")
    return sd


def _weight_arena(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """name -> an empty view (of dtypes[name]) of one huge-page buffer (util.mapped), every
    start 64-byte aligned: the weights in the order of `shapes` (each layer's q, k, v, o, gate,
    up, down), then the biases, so the projections Layer merges are adjacent wherever their
    sizes keep the alignment."""
    order = [k for k in shapes if not k.endswith(".bias")] + [k for k in shapes if k.endswith(".bias")]
    spans, end = {}, 0  # name -> (offset, bytes)
    for k in order:
        spans[k] = end, math.prod(shapes[k]) * dtypes[k].itemsize
        end += -(-spans[k][1] // 64) * 64
    buf = mapped_zeros((end,), torch.uint8, huge_pages=True)
    return {k: buf[o: o + n].view(dtypes[k]).view(shapes[k]) for k, (o, n) in spans.items()}


def _merged(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts stacked along dim 0: a view when they lie back to back in one buffer (as
    load_state_dict places them), else a copy."""
    first, end = parts[0], parts[0].data_ptr()
    for t in parts:
        if not t.is_contiguous() or t.data_ptr() != end or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
            return torch.cat(parts, 0)
        end += t.nbytes
    return first.as_strided((sum(t.shape[0] for t in parts),) + tuple(first.shape[1:]), first.stride())


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """fp32 [head_dim / 2], computed exactly as transformers does (default and llama3)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    inv = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv)


def positions_from_cu_seqlens(cu: list[int], device, past: Optional[Sequence[int]] = None) -> torch.Tensor:
    """int64 [T]: past[b] .. past[b] + len - 1 for each packed sequence b (past: the tokens a
    sequence already has in the KV cache; None: 0 for all)."""
    starts = past or [0] * (len(cu) - 1)  # (a list, then one tensor: a decode step's few rows
    # took 4 tensor ops, ~120 us on the cold caches a step leaves)
    return torch.tensor([p for b, p0 in enumerate(starts) for p in range(p0, p0 + cu[b + 1] - cu[b])],
                        dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class LoRASpec:
    """A trainable LoRA (Backbone.add_lora): rank, alpha, dropout (peft's: on the LoRA input
    only) and target modules."""

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.1
    targets: tuple = TARGET_MODULES

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be an int >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGET_MODULES]
        if bad or not self.targets:
            raise ValueError(f"LoRA target modules must be a non-empty subset of {TARGET_MODULES}, got {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class TrainedLoRA:
    """The trainable LoRA's per-forward state: every row -> adapter 0 of a one-slot stack."""

    meta: LoRAMeta
    scaling: torch.Tensor  # float32 [1]
    spec: LoRASpec


@dataclass
class ForwardContext:
    """Everything about one forward's batch that is not the token ids, built once before the
    model runs (by Backbone.hidden, or by the engine for one step: engine/step.py) and read
    by every layer: the model only computes."""

    positions: torch.Tensor  # int64 [T]: each row's position in its sequence
    attention: AttentionPlan  # who attends to what: packed self-attention, or over the paged KV cache
    lora: Optional[LoRAMeta] = None  # the rows with an engine adapter (resident_adapters); None: base only
    trained: Optional[TrainedLoRA] = None  # the trainable LoRA (Layer.lora_A / lora_B)
    autocast: Optional[torch.dtype] = None  # training under autocast: one dtype for the fused LoRA op


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def projection_groups(cfg: ModelConfig) -> dict:
    """Merged projection -> (weight attr, bias attr, ((target module, first column, end), ...))."""
    q, kv, i, d = cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.hidden_size
    return {
        "qkv": ("qkv_weight", "qkv_bias", (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))),
        "o": ("o_weight", "o_bias", (("o_proj", 0, d),)),
        "gate_up": ("gate_up_weight", "gate_up_bias", (("gate_proj", 0, i), ("up_proj", i, 2 * i))),
        "down": ("down_weight", "down_bias", (("down_proj", 0, d),)),
    }


def _stacked_rows(parts: list) -> Optional[torch.Tensor]:
    """The [L, sum r, in] tensor that parts (lora_a [L, r_i, in] each) are consecutive row
    blocks of, or None when they are not views of one such tensor."""
    L, _, fin = parts[0].shape
    R = sum(p.shape[1] for p in parts)
    ptr, offset = parts[0].untyped_storage().data_ptr(), parts[0].storage_offset()
    for p in parts:
        if (p.untyped_storage().data_ptr() != ptr or p.storage_offset() != offset
                or (L > 1 and p.stride(0) != R * fin) or p.stride(1) != fin or p.stride(2) != 1):
            return None
        offset += p.shape[1] * fin
    return parts[0].as_strided((L, R, fin), (R * fin, fin, 1))


def merge_layer(groups: dict, stacks: dict) -> LayerLoRA:
    """One layer's stacks (module -> LoRAStack), merged per projection: where a group's
    lora_a are views of one tensor (as adapters.py builds them) that tensor is used, else
    they are copied into one and the stacks become views of it."""
    lora, merged = dict(stacks), {}
    for group, (_, _, mods) in groups.items():
        present = [(n, s) for n, s, _ in mods if n in lora]
        if not present:
            continue
        parts = [lora[n].lora_a for n, _ in present]
        stacked = _stacked_rows(parts)
        copied = stacked is None
        if copied:
            stacked = torch.cat(parts, 1)
        slices, off = [], 0
        for n, col in present:
            st = lora[n]
            r = st.lora_a.shape[1]
            if copied:
                lora[n] = LoRAStack(stacked[:, off : off + r], st.lora_b, st.scaling)
            slices.append(ops.LoRASlice(off, st.lora_b, st.scaling, col))
            off += r
        merged[group] = ops.MergedLoRA(stacked, slices)
    return LayerLoRA(lora, merged)


class Layer(nn.Module):
    """One decoder layer: its merged base weights (frozen unless the whole model trains)
    and an optional trainable LoRA `lora_A` / `lora_B` (Backbone.add_lora). The engine's
    adapters are not held here: each forward passes the layer its LayerLoRA (stacks and
    merged projections) from the model's one ResidentAdapters."""

    def __init__(self, cfg: ModelConfig, sd: dict, l: int, groups: dict):
        super().__init__()
        p = f"model.layers.{l}."
        a, m = p + "self_attn.", p + "mlp."

        def param(t):
            return None if t is None else nn.Parameter(t, requires_grad=False)

        def cat(*names):  # the sources leave state_dict: a copy frees them once merged
            ts = [sd.pop(n, None) for n in names]
            return param(None if ts[0] is None else _merged(ts))

        def cat_scales(*names):  # int8 weights' per-row scales, merged as their weights (None: float weights)
            return cat(*(n + SCALE_SUFFIX for n in names))

        self.cfg, self.groups = cfg, groups
        self.input_norm = param(sd[p + "input_layernorm.weight"])
        self.post_norm = param(sd[p + "post_attention_layernorm.weight"])
        self.qkv_weight = cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")  # [q; k; v]
        self.qkv_bias = cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
        self.o_weight = param(sd[a + "o_proj.weight"])
        self.o_bias = param(sd.get(a + "o_proj.bias"))
        self.gate_up_weight = cat(m + "gate_proj.weight", m + "up_proj.weight")  # [gate; up]
        self.gate_up_bias = cat(m + "gate_proj.bias", m + "up_proj.bias")
        self.down_weight = param(sd[m + "down_proj.weight"])
        self.down_bias = param(sd.get(m + "down_proj.bias"))
        self.qkv_scale = cat_scales(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
        self.o_scale = cat_scales(a + "o_proj.weight")
        self.gate_up_scale = cat_scales(m + "gate_proj.weight", m + "up_proj.weight")
        self.down_scale = cat_scales(m + "down_proj.weight")
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()

    def add_lora(self, spec: LoRASpec, module_shapes: dict) -> None:
        dev = self.o_weight.device
        for _, _, mods in self.groups.values():
            for name, _, _ in mods:
                if name in spec.targets:
                    fin, fout = module_shapes[name]
                    A = torch.empty(spec.r, fin, device=dev, dtype=torch.float32)  # fp32 master weights
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's (nn.Linear's) init of lora_A
                    self.lora_A[name] = nn.Parameter(A)
                    self.lora_B[name] = nn.Parameter(torch.zeros(fout, spec.r, device=dev, dtype=torch.float32))

    # -- projections ----------------------------------------------------------------------

    def proj(self, group: str, x: torch.Tensor, ctx: ForwardContext,
             lora: Optional[LayerLoRA] = None) -> torch.Tensor:
        """The merged projection `group` of x: one base matmul, plus each LoRA in its slice
        (the engine's adapters `lora`, for the rows ctx.lora gives one)."""
        w_name, b_name, mods = self.groups[group]
        w, b = getattr(self, w_name), getattr(self, b_name)
        scale = getattr(self, group + SCALE_SUFFIX)
        if scale is not None:  # int8 weights: inference only (Backbone.add_lora and training refuse them)
            y = ops.linear(x, w, b, scale=scale)
        else:
            if ctx.autocast is not None:
                dt = ctx.autocast
                x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
            if ctx.trained is not None and any(n in self.lora_A for n, _, _ in mods):
                return self._trained_proj(mods, x, w, b, ctx.trained)
            y = ops.linear(x, w, b)
        if lora is not None and ctx.lora is not None and not ctx.lora.no_lora:
            merged = lora.merged.get(group)
            if merged is not None:  # one shrink and one expand for the whole group, in place
                merged.add_(y, x, ctx.lora)
        return y

    def _trained_proj(self, mods, x, w, b, lora: TrainedLoRA) -> torch.Tensor:
        """Base + trainable LoRA. Without dropout, ONE ops.lora_linear on the merged weight:
        the group's A's are stacked along r and its B's form a block-diagonal [out, n r], so
        x A^T B^T lands each module's update in its own slice (the off-diagonal blocks are
        constant zeros: no gradient reaches them). Dropout (peft's: on the LoRA input only)
        gives the LoRA another input than the base, which one fused call cannot take, so
        then it is F.linear(x) + s (drop(x) A^T) B^T per module. Measured on this 2-core CPU
        (bench_train's tiny preset, 1 thread, ms per step, generator / retriever):
          dropout 0.1: fused + low-rank correction for the dropped input  562 / 1290
                       this split path                                     452 /  947
          dropout 0:   fused ops.lora_linear                               371 /  778
                       the split path without dropout                      345 /  753
        """
        dt = x.dtype
        names = [n for n, _, _ in mods if n in self.lora_A]
        A = torch.cat([self.lora_A[n].to(dt) for n in names], 0)
        if lora.spec.dropout > 0 and self.training:
            u = F.dropout(x, lora.spec.dropout) @ A.t()
            parts, i = [], 0
            for n, s, e in mods:
                if n in self.lora_A:
                    r = self.lora_A[n].shape[0]
                    parts.append(u[:, i : i + r] @ self.lora_B[n].to(dt).t())
                    i += r
                else:
                    parts.append(x.new_zeros(x.shape[0], e - s))
            upd = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            return F.linear(x, w, b) + upd * lora.spec.scaling
        blocks = [self.lora_B[n].to(dt) if n in self.lora_B else w.new_zeros(e - s, 0, dtype=dt) for n, s, e in mods]
        B = blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)
        return ops.lora_linear(x, w, b, A[None], B[None], lora.scaling, lora.meta)

    def weights(self) -> ops.LayerWeights:
        return ops.LayerWeights(self.input_norm, self.qkv_weight, self.qkv_bias, self.o_weight, self.o_bias,
                                self.post_norm, self.gate_up_weight, self.gate_up_bias, self.down_weight,
                                self.down_bias)

    def scales(self) -> Optional[ops.LayerScales]:
        """The int8 weights' per-row scales (None: float weights)."""
        if self.qkv_scale is None:
            return None
        return ops.LayerScales(self.qkv_scale, self.o_scale, self.gate_up_scale, self.down_scale)

    # -- the layer ------------------------------------------------------------------------

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext, li: int,
                lora: Optional[LayerLoRA] = None) -> torch.Tensor:
        cfg = self.cfg
        T = h.shape[0]
        x = ops.rms_norm(h, self.input_norm, cfg.rms_norm_eps)
        qkv = self.proj("qkv", x, ctx, lora)
        H, qk = cfg.num_attention_heads, cfg.q_size + cfg.kv_size
        qk_rot = ops.rope(qkv[:, :qk].view(T, H + cfg.num_key_value_heads, cfg.head_dim), cos, sin)  # q, k at once
        v = qkv[:, qk:].view(T, cfg.num_key_value_heads, cfg.head_dim)
        attn = ctx.attention.attend(li, qk_rot[:, :H], qk_rot[:, H:], v)
        del qkv, qk_rot, v  # freed before the MLP, whose activations are a long step's largest
        h, x = ops.add_rms_norm(h, self.proj("o", attn, ctx, lora), self.post_norm, cfg.rms_norm_eps)
        del attn
        return h + self.proj("down", ops.silu_mul(self.proj("gate_up", x, ctx, lora)), ctx, lora)


def check_packed(input_ids, cu_seqlens) -> list[int]:
    """Validate a packed batch (input_ids [T], int32 cu_seqlens [B + 1]); returns cu_seqlens as a list."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor [T] (packed sequences)")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be an int32 tensor [B + 1]")
    cu = cu_seqlens.tolist()
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != input_ids.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T = {input_ids.shape[0]}, got {cu}")
    if any(cu[b + 1] <= cu[b] for b in range(len(cu) - 1)):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {cu}")
    return cu


def pack(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids int64 [T], cu_seqlens int32 [B + 1])."""
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return torch.tensor([t for s in seqs for t in s], dtype=torch.long), cu


# ----------------------------------------------------------------------------- the model


class Backbone(nn.Module):
    """The decoder over packed sequences, for serving and training alike; see the module docstring.

    Loaded frozen. Training either unfreezes the base (`requires_grad_(True)`: continual
    pre-training) or adds one trainable LoRA on the frozen base (`add_lora`); autograd runs
    through the same layers and ops the engine runs (ops.linear falls back to F.linear in
    a graph). The engine's adapters are one ResidentAdapters object (`resident_adapters`:
    per-layer stacks per target module, the slot table, the records; filled by adapters.py)
    and picked per row through a LoRAMeta."""

    def __init__(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]):
        """state_dict: HF names -> tensors (see load_state_dict); the q/k/v and gate/up
        tensors are taken out of it as they are merged."""
        super().__init__()
        self.config = cfg
        sd = state_dict
        def frozen(name):
            t = sd.get(name)
            return None if t is None else nn.Parameter(t, requires_grad=False)

        self.embed = frozen("model.embed_tokens.weight")
        self.norm = frozen("model.norm.weight")
        # tied: the same Parameter under a second name (named_parameters lists it once)
        self.lm_head = self.embed if cfg.tie_word_embeddings else frozen("lm_head.weight")
        # int8 weights (load_state_dict with torch.int8): the rows' scales, tied as the weights; else None
        self.embed_scale = frozen("model.embed_tokens.weight" + SCALE_SUFFIX)
        self.lm_head_scale = self.embed_scale if cfg.tie_word_embeddings else frozen("lm_head.weight" + SCALE_SUFFIX)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(self.embed.device), persistent=False)
        self.groups = projection_groups(cfg)
        self.layers = nn.ModuleList(Layer(cfg, sd, l, self.groups) for l in range(cfg.num_hidden_layers))
        q, kv, i, d = cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.hidden_size
        self.module_shapes = {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
        }  # fmt: skip  (in, out) of every target module
        # the engine's resident adapters, one object replaced whole (set_lora_stacks; adapters.py)
        self.resident_adapters = ResidentAdapters.empty(cfg.num_hidden_layers)
        self.lora_spec: Optional[LoRASpec] = None  # the trainable LoRA, once add_lora is called
        self.activation_checkpointing = False  # recompute each layer in backward (training memory)
        self._stack: Optional[tuple] = None  # (KV cache key, ops.DecoderStack): see _decoder_stack

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's, adapters') dtype: the weights', float32 for int8 weights."""
        return self.norm.dtype

    @property
    def quantized(self) -> bool:
        """Whether the projections, embedding and LM head hold weight-only int8 (per-row scales)."""
        return self.embed_scale is not None

    @property
    def num_lora_slots(self) -> int:
        return self.resident_adapters.num_slots

    @property
    def adapter_slots(self) -> dict:
        """Resident adapter name -> slot (read-only view of resident_adapters)."""
        return self.resident_adapters.slots

    @property
    def adapter_infos(self) -> dict:
        """Resident adapter name -> AdapterInfo (its true ranks and alphas, its config)."""
        return self.resident_adapters.infos

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device="cpu") -> "Backbone":
        """Load a HF checkpoint directory: config.json + model.safetensors, or sharded
        *.safetensors + model.safetensors.index.json; or a model name / .gguf file (model_store).
        dtype torch.int8: weight-only int8 (CPU, inference): every projection, the embedding and
        the LM head quantized per output row as they load (ops.linear's quantize_int8), norms,
        biases, activations, KV cache and adapters float32."""
        path = resolve_model(path)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"no config.json in {path!r}: not a HF model directory")
        raw = read_json(cfg_path, "model config")
        if not isinstance(raw, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        try:
            cfg = ModelConfig.from_hf(raw)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {str(e).removeprefix('config.json: ')}") from None
        model = cls(cfg, load_state_dict(path, cfg, dtype, torch.device(device)))
        release_free_heap()  # what reading and merging the checkpoint freed
        return model

    # -- LoRA stacks (filled by adapter loading; see LoRAStack) --------------------------

    def set_lora_stacks(self, stacks: Sequence[dict], num_slots: int, adapter_slots: Optional[dict] = None,
                        infos: Optional[dict] = None) -> None:
        """Replace the resident adapters (one ResidentAdapters object) with per-layer stacks:
        stacks[l][module] = LoRAStack with L = num_slots slots. Modules absent from a layer's
        dict run base only. Shapes / dtypes are checked, and nothing changes unless all checks
        pass. adapter_slots (name -> slot, a bijection onto range(num_slots)) and infos (name
        -> AdapterInfo) come with the stacks; without them the stacks are the caller's own,
        addressed by slot."""
        if adapter_slots is not None and sorted(adapter_slots.values()) != list(range(num_slots)):
            raise ValueError(f"adapter_slots must map names onto slots 0..{num_slots - 1}, got {adapter_slots}")
        if len(stacks) != len(self.layers):
            raise ValueError(f"stacks must have one dict per layer ({len(self.layers)}), got {len(stacks)}")
        for l, st in enumerate(stacks):
            for name, s in st.items():
                if name not in self.module_shapes:
                    raise ValueError(f"layer {l}: unknown target module {name!r}; expected one of {TARGET_MODULES}")
                fin, fout = self.module_shapes[name]
                if (s.lora_a.dim() != 3 or s.lora_a.shape[0] != num_slots or s.lora_a.shape[2] != fin
                        or tuple(s.lora_b.shape) != (num_slots, fout, s.lora_a.shape[1])
                        or tuple(s.scaling.shape) != (num_slots,)):
                    raise ValueError(
                        f"layer {l} {name}: expected lora_a [{num_slots}, r, {fin}], lora_b [{num_slots}, {fout}, r], "
                        f"scaling [{num_slots}], got {tuple(s.lora_a.shape)}, {tuple(s.lora_b.shape)}, "
                        f"{tuple(s.scaling.shape)}"
                    )
                if s.lora_a.dtype != self.dtype or s.lora_b.dtype != self.dtype or s.scaling.dtype != torch.float32:
                    raise ValueError(f"layer {l} {name}: lora_a/lora_b must be {self.dtype}, scaling float32")
        if infos is not None and set(infos) != set(adapter_slots or {}):
            raise ValueError("infos must name the same adapters as adapter_slots")
        self.resident_adapters = ResidentAdapters(num_slots, tuple(merge_layer(self.groups, st) for st in stacks),
                                                  dict(adapter_slots or {}), dict(infos or {}))

    # -- PEFT adapters (bsharedrag_fast/adapters.py: format, slots, atomicity) ------------

    def load_adapter(self, peft_dir, name: str) -> None:
        """Load a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) into
        a new slot under `name`. Resident adapters keep their slots and outputs. Any error
        (missing file, bad shape, unsupported option, duplicate name) is a ValueError and
        leaves the model unchanged."""
        peft_adapters.load_adapter(self, peft_dir, name)
        # the stacks were rebuilt one slot larger: the old ones' pages go back to the OS (five
        # r=16 adapters on smollm2-135m: 93 MB of stacks had taken 173 MB of RSS)
        release_free_heap()

    def save_adapter(self, name: str, out_dir) -> None:
        """Write `name` as a PEFT directory (loadable by peft.PeftModel.from_pretrained),
        each module at its true rank (rank_pattern / alpha_pattern where they differ)."""
        peft_adapters.save_adapter(self, name, out_dir)

    def unload_adapter(self, name: str) -> None:
        """Free `name`'s slot: the stacks are compacted, so later adapters' slots move down
        by one (address adapters by name; slot ints / LoRAMetas from before are stale)."""
        peft_adapters.unload_adapter(self, name)
        release_free_heap()

    @property
    def adapters(self) -> list[str]:
        """Names of the resident adapters, in slot order."""
        return sorted(self.adapter_slots, key=self.adapter_slots.get)

    def memory_report(self, cache=None) -> dict:
        """Resident bytes: {"backbone", "adapters": {name: bytes}, "lora_stacks", "cache", "total"}.

        backbone counts each storage once (a tied LM head shares the embedding); adapters
        gives each adapter's share of the stacks (padded=True, so the shares add up to
        lora_stacks); cache is `cache.nbytes` of a KVCache, if given."""
        tensors = [p for n, p in self.named_parameters() if ".lora_" not in n] + [self.inv_freq]
        seen, backbone = set(), 0
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                backbone += t.numel() * t.element_size()
        stacks = peft_adapters.lora_nbytes(self)
        cache_bytes = 0 if cache is None else cache.nbytes
        return {
            "backbone": backbone,
            "adapters": {name: self.adapter_nbytes(name, padded=True) for name in self.adapters},
            "lora_stacks": stacks,
            "cache": cache_bytes,
            "total": backbone + stacks + cache_bytes,
        }

    def adapter_nbytes(self, name: str, padded: bool = False) -> int:
        """Resident bytes of one adapter: its weights at true rank, or (padded=True) its whole
        slot of every stack incl. zero padding; see adapters.adapter_nbytes / lora_nbytes."""
        return peft_adapters.adapter_nbytes(self, name, padded)

    def adapter_slot(self, adapter) -> int:
        """A sequence's adapter as its slot: a slot int, an adapter name, or None / -1 (base)."""
        if adapter is None:
            return -1
        if isinstance(adapter, str):
            if adapter not in self.adapter_slots:
                raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(self.adapter_slots)}")
            return self.adapter_slots[adapter]
        return int(adapter)

    def lora_meta(self, adapters, cu: list[int]) -> Optional[LoRAMeta]:
        """The LoRA metadata of a packed batch (None: no row has an adapter). adapters: None,
        a LoRAMeta, or one entry per sequence: a slot int, an adapter name (see
        adapter_slots), or None / -1 for the base model."""
        if adapters is None or isinstance(adapters, LoRAMeta):
            return adapters
        B = len(cu) - 1
        if len(adapters) != B:
            raise ValueError(f"adapters must have one entry per sequence ({B}), got {len(adapters)}")
        slots = [self.adapter_slot(a) for a in adapters]
        if all(s == -1 for s in slots):
            return None
        lens = torch.tensor([cu[b + 1] - cu[b] for b in range(B)])
        ta = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32), lens).to(self.device)
        return LoRAMeta.build(ta, self.num_lora_slots)

    # -- forward -----------------------------------------------------------------------

    def compute(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The one forward of every path (training, cache-less, engine steps): embedding and
        every layer, [T, d] before the final norm."""
        cos, sin = ops.rope_cos_sin(self.inv_freq, ctx.positions, ctx.autocast or self.dtype)
        ids = input_ids.to(self.device)
        h = F.embedding(ids, self.embed)
        if self.embed_scale is not None:  # int8 rows times their scales
            h = ops.dequantize_int8(h, self.embed_scale.index_select(0, ids))
        call = self._fused_call(h, ctx)
        if call is not None:  # the whole stack in one C++ call (ops.DecoderStack), same kernels, same result
            return self._decoder_stack(ctx.attention)(h, cos, sin, ctx.attention.slots, call.tables, call.cu,
                                                      call.lens)
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        adapters = self.resident_adapters.layers if ctx.lora is not None else [None] * len(self.layers)  # read once
        for li, (layer, lora) in enumerate(zip(self.layers, adapters)):
            if checkpointed:
                h = checkpoint(layer, h, cos, sin, ctx, li, lora, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx, li, lora)
        return h

    def _fused_call(self, h: torch.Tensor, ctx: ForwardContext):
        """The step's attention call when ops.DecoderStack can run it (FUSED_LAYERS, see the
        module top): a CPU inference step of cached rows only, no adapter rows, and the dense
        C++ linear being what ops.linear picks for every projection at this row count."""
        if FUSED_LAYERS != "auto" or h.device.type != "cpu" or h.dtype not in ops.DecoderStack.DTYPES:
            return None
        if ctx.trained is not None or ctx.autocast is not None or torch.is_grad_enabled():
            return None
        if ctx.lora is not None and not ctx.lora.no_lora:
            return None
        cfg, T = self.config, h.shape[0]
        weights = torch.int8 if self.quantized else h.dtype
        if not all(cpp_pays(weights, T, n) for n in (cfg.hidden_size, cfg.q_size, cfg.intermediate_size)):
            return None
        if _backends._import_cpp() is None:
            return None
        return ctx.attention.whole_step_call()

    def _decoder_stack(self, plan: AttentionPlan) -> ops.DecoderStack:
        """The DecoderStack of these weights over the plan's KV caches, built once per cache
        (dropped by _apply: .to() and friends replace the tensors it points at)."""
        key = (plan.k_cache[0].data_ptr(), plan.v_cache[0].data_ptr(), len(plan.k_cache))
        if self._stack is None or self._stack[0] != key:
            cfg = self.config
            shape = ops.DecoderShape(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                     cfg.intermediate_size, cfg.rms_norm_eps, cfg.sliding_window)
            scales = [l.scales() for l in self.layers] if self.quantized else None
            self._stack = (key, ops.DecoderStack([l.weights() for l in self.layers], shape, plan.k_cache,
                                                 plan.v_cache, scales))
        return self._stack[1]

    def _apply(self, fn, recurse=True):
        self._stack = None
        return super()._apply(fn, recurse)

    def hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, adapters=None) -> torch.Tensor:
        """[T, d] after the last layer, before the final norm (`logits` and ops.pool fuse
        it). Differentiable: the trainable LoRA (add_lora) applies to every row; adapters
        picks the engine's resident adapters per sequence (see lora_meta)."""
        cu = check_packed(input_ids, cu_seqlens)
        dev = self.device
        autocast = _autocast_dtype(dev)
        trained = None
        if self.lora_spec is not None:
            meta = LoRAMeta.build(torch.zeros(cu[-1], dtype=torch.int32, device=dev), 1)
            trained = TrainedLoRA(meta, self.lora_scaling, self.lora_spec)
        ctx = ForwardContext(positions_from_cu_seqlens(cu, dev), AttentionPlan.packed(cu, self.config.sliding_window),
                             lora=self.lora_meta(adapters, cu), trained=trained, autocast=autocast)
        return self.compute(input_ids, ctx)

    def logits(self, h: torch.Tensor, rows=None) -> torch.Tensor:
        """Final norm + LM head on the given rows of `hidden` (every row when None)."""
        every = rows is None or (len(rows) == h.shape[0] and all(int(r) == i for i, r in enumerate(rows)))
        if not every:  # (a decode step's rows are all its rows: no copy)
            h = h.index_select(0, torch.as_tensor(rows, dtype=torch.long, device=h.device))
        x, head = ops.rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head
        if self.lm_head_scale is not None:
            return ops.linear(x, head, scale=self.lm_head_scale)
        dt = _autocast_dtype(x.device)
        if dt is not None:
            x, head = x.to(dt), head.to(dt)
        return ops.linear(x, head)

    @torch.inference_mode()
    def hidden_states(self, input_ids, cu_seqlens, adapters=None, final_norm: bool = True) -> torch.Tensor:
        """[T, d] after the final RMSNorm; final_norm=False returns the rows before it (so
        ops.pool(norm_weight=model.norm, eps=model.config.rms_norm_eps) can fuse it)."""
        h = self.hidden(input_ids, cu_seqlens, adapters)
        return ops.rms_norm(h, self.norm, self.config.rms_norm_eps) if final_norm else h

    @torch.inference_mode()
    def forward(self, input_ids, cu_seqlens, adapters=None, logits_rows=None) -> torch.Tensor:
        """Logits [T, vocab], or [len(logits_rows), vocab] for just those rows (so the rows
        of embedding requests and non-final prompt tokens skip the LM head)."""
        return self.logits(self.hidden(input_ids, cu_seqlens, adapters), logits_rows)

    # -- training -------------------------------------------------------------------------

    def add_lora(self, spec: LoRASpec) -> "Backbone":
        """Add a trainable LoRA (peft's init: A kaiming-uniform, B zero; fp32 master weights
        also over a bf16 base) on every target module; the base stays frozen."""
        if self.lora_spec is not None:
            raise ValueError("this model already has a trainable LoRA")
        if self.quantized:
            raise ValueError("int8 weights are for inference: train on a float32 or bfloat16 model")
        for layer in self.layers:
            layer.add_lora(spec, self.module_shapes)
        self.lora_spec = spec
        self.register_buffer("lora_scaling", torch.tensor([spec.scaling], dtype=torch.float32, device=self.device),
                             persistent=False)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed fp32 cross-entropy, number of labelled rows): labels [T] hold the next
        token of each row or IGNORE; the LM head runs only on labelled rows."""
        rows = (labels != IGNORE).nonzero().squeeze(1)
        if rows.numel() == 0:
            return h.sum() * 0.0, 0
        logits = self.logits(h, rows).float()
        return F.cross_entropy(logits, labels.index_select(0, rows), reduction="sum"), int(rows.numel())

    def embed_sequences(self, h: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "last") -> torch.Tensor:
        """L2-normalised pooled embeddings [B, d] of `hidden` rows (final RMSNorm fused into ops.pool)."""
        return ops.pool(h, cu_seqlens.to(h.device), mode=pooling, normalize=True,
                        norm_weight=self.norm.to(h.dtype), eps=self.config.rms_norm_eps)

    def lora_weights(self) -> dict:
        """{(layer, module): (A [r, in], B [out, r])} of the trainable LoRA."""
        return {(l, n): (layer.lora_A[n], layer.lora_B[n])
                for l, layer in enumerate(self.layers) for n in layer.lora_A}  # fmt: skip

    def load_lora(self, peft_dir: str) -> None:
        """Start the trainable LoRA from a PEFT adapter (e.g. a first-round retriever): its
        modules, ranks and alphas must match this model's LoRASpec."""
        if self.lora_spec is None:
            raise ValueError("load_lora needs a trainable LoRA (add_lora)")
        spec = self.lora_spec
        info, weights = peft_adapters.read_adapter(self, peft_dir, "init")
        mine = self.lora_weights()
        if set(weights) != set(mine):
            raise ValueError(f"{peft_dir}: adapter modules differ from the training targets {spec.targets}")
        bad = {k: v for k, v in info.modules.items() if v != (spec.r, spec.alpha) or info.use_rslora}
        if bad:
            raise ValueError(f"{peft_dir}: rank/alpha {next(iter(bad.values()))} differ from r={spec.r}, "
                             f"alpha={spec.alpha} (or use_rslora is set)")
        with torch.no_grad():
            for k, (A, B) in weights.items():
                mine[k][0].copy_(A)
                mine[k][1].copy_(B)

    def save_lora(self, out_dir: str, base_model: Optional[str] = None) -> None:
        """The trainable LoRA as a PEFT directory (peft.PeftModel.from_pretrained and
        load_adapter read it)."""
        if self.lora_spec is None:
            raise ValueError("save_lora needs a trainable LoRA (add_lora)")
        weights = self.lora_weights()
        modules = {k: (self.lora_spec.r, self.lora_spec.alpha) for k in weights}
        peft_adapters.write_adapter(out_dir, weights, modules, len(self.layers), config={
            "base_model_name_or_path": base_model, "lora_dropout": self.lora_spec.dropout})

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights under their HF names (merged q/k/v and gate/up split back), on CPU."""
        if self.quantized:
            raise ValueError("int8 weights are not saved: save from a float32 or bfloat16 model")
        cfg = self.config
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        parents = {"qkv": "self_attn", "o": "self_attn", "gate_up": "mlp", "down": "mlp"}
        for l, layer in enumerate(self.layers):
            p = f"model.layers.{l}."
            out[p + "input_layernorm.weight"] = layer.input_norm
            out[p + "post_attention_layernorm.weight"] = layer.post_norm
            for g, (w_name, b_name, mods) in self.groups.items():
                for kind, t in (("weight", getattr(layer, w_name)), ("bias", getattr(layer, b_name))):
                    if t is not None:
                        for name, s, e in mods:
                            out[f"{p}{parents[g]}.{name}.{kind}"] = t[s:e]
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def save_pretrained(self, out_dir: str, src_dir: str) -> None:
        """HF layout: config.json from src_dir (with this dtype), model.safetensors, and
        src_dir's tokenizer files."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        src_dir = resolve_model(src_dir)
        hf_cfg = read_json(os.path.join(src_dir, "config.json"), "model config")
        hf_cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        save_file(self.hf_state_dict(), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(out_dir, "config.json"), hf_cfg, indent=2, sort_keys=True)
        copy_tokenizer(src_dir, out_dir)
