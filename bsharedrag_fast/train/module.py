"""The differentiable model used by training: the Backbone's decoder as an nn.Module.

Same math and building blocks as bsharedrag_fast/model.py (rms_norm, RoPE, per-sequence
SDPA over packed sequences, merged QKV and gate_up weights), with parameters:
- full mode (pre-training): every base weight is an nn.Parameter;
- LoRA mode: the base is frozen and each target module has a trainable A [r, in] and
  B [out, r] (peft's init: A kaiming-uniform, B zero; scaling alpha / r).

Without dropout, a projection with LoRA is ONE `ops.lora_linear` call on its merged
weight: the A's of q/k/v (gate/up) are stacked along r and their B's form a
block-diagonal [out_q + out_k + out_v, 3r], so x A^T B^T lands each module's update in
its own slice (the off-diagonal blocks are constant zeros: no gradient reaches them).
One LoRAMeta (every row -> adapter 0) is built per forward and reused by every layer.

Dropout (peft's: on the LoRA input only) gives the LoRA a different input than the base,
which one fused call cannot take. In training with dropout > 0 a projection is therefore
F.linear(x) plus, per target module, s * (drop(x) A^T) B^T on its slice (one mask per
merged group; peft draws one per module, the same distribution). Measured on this 2-core
CPU (bench_train's tiny preset, 1 thread, other jobs running; ms per step, generator / retriever):
  dropout 0.1: fused + low-rank correction for the dropped input  562 / 1290
               this split path                                     452 /  947
  dropout 0:   fused ops.lora_linear                               371 /  778
               the split path without dropout                      345 /  753
The fused op stays the path without dropout (eval, dropout=0, the gradient-parity tests,
and GPU runs where the Triton kernels apply), within 3-7% of the split path here.

Full mode has no LoRA rows, so its projections are plain F.linear: exactly what
lora_linear runs for base-only rows, without an empty adapter stack to carry around.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..adapters import read_adapter, write_adapter
from ..model import (TARGET_MODULES, ModelConfig, _attention, apply_rope, check_packed, load_state_dict,
                     positions_from_cu_seqlens, rms_norm, rope_cos_sin, rope_inv_freq)  # fmt: skip
from ..model_store import resolve_model
from .init import copy_tokenizer

IGNORE = -100  # label of rows that carry no loss (as torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class LoRASpec:
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


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class _Layer(nn.Module):
    """One decoder layer; projections are grouped as (merged weight, bias, module names)."""

    def __init__(self, cfg: ModelConfig, sd: dict, l: int, full: bool, lora: Optional[LoRASpec]):
        super().__init__()
        p = f"model.layers.{l}."
        a, m = p + "self_attn.", p + "mlp."

        def param(t):
            return None if t is None else nn.Parameter(t, requires_grad=full)

        def cat(*names):
            ts = [sd.get(n) for n in names]
            return None if ts[0] is None else torch.cat(ts, 0)

        self.input_norm = param(sd[p + "input_layernorm.weight"])
        self.post_norm = param(sd[p + "post_attention_layernorm.weight"])
        self.qkv_weight = param(cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"))
        self.qkv_bias = param(cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"))
        self.o_weight = param(sd[a + "o_proj.weight"])
        self.o_bias = param(sd.get(a + "o_proj.bias"))
        self.gate_up_weight = param(cat(m + "gate_proj.weight", m + "up_proj.weight"))
        self.gate_up_bias = param(cat(m + "gate_proj.bias", m + "up_proj.bias"))
        self.down_weight = param(sd[m + "down_proj.weight"])
        self.down_bias = param(sd.get(m + "down_proj.bias"))
        q, kv, i, d = cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.hidden_size
        self.groups = {  # group -> (weight attr, bias attr, [(module, out size)])
            "qkv": ("qkv_weight", "qkv_bias", (("q_proj", q), ("k_proj", kv), ("v_proj", kv))),
            "o": ("o_weight", "o_bias", (("o_proj", d),)),
            "gate_up": ("gate_up_weight", "gate_up_bias", (("gate_proj", i), ("up_proj", i))),
            "down": ("down_weight", "down_bias", (("down_proj", d),)),
        }
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        if lora is not None:
            fin = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": q, "gate_proj": d, "up_proj": d, "down_proj": i}
            dev, dt = self.o_weight.device, torch.float32  # fp32 master weights, also over a bf16 base
            for _, _, mods in self.groups.values():
                for name, out in mods:
                    if name in lora.targets:
                        A = torch.empty(lora.r, fin[name], device=dev, dtype=dt)
                        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's (nn.Linear's) init of lora_A
                        self.lora_A[name] = nn.Parameter(A)
                        self.lora_B[name] = nn.Parameter(torch.zeros(out, lora.r, device=dev, dtype=dt))

    def _lora(self, mods, dt) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked A [1, n r, in] and block-diagonal B [1, out, n r] of a group."""
        names = [n for n, _ in mods if n in self.lora_A]
        A = torch.cat([self.lora_A[n].to(dt) for n in names], 0)
        blocks = [self.lora_B[n].to(dt) if n in self.lora_B else self.o_weight.new_zeros(out, 0, dtype=dt)
                  for n, out in mods]  # fmt: skip
        B = blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)
        return A[None], B[None]

    def proj(self, group: str, x: torch.Tensor, ctx: "_Ctx") -> torch.Tensor:
        w_name, b_name, mods = self.groups[group]
        w, b = getattr(self, w_name), getattr(self, b_name)
        dt = _autocast_dtype(x.device) or w.dtype
        x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
        if ctx.meta is None or not any(n in self.lora_A for n, _ in mods):
            return F.linear(x, w, b)
        if ctx.dropout > 0 and self.training:
            return F.linear(x, w, b) + self._dropped_lora(mods, x, ctx, dt)
        A, B = self._lora(mods, dt)
        return ops.lora_linear(x, w, b, A, B, ctx.scaling, ctx.meta)

    def _dropped_lora(self, mods, x, ctx: "_Ctx", dt) -> torch.Tensor:
        """s * (drop(x) A^T) B^T of each module, side by side in the group's columns."""
        names = [n for n, _ in mods if n in self.lora_A]
        u = F.dropout(x, ctx.dropout) @ torch.cat([self.lora_A[n].to(dt) for n in names], 0).t()
        parts, i = [], 0
        for n, out in mods:
            if n in self.lora_A:
                r = self.lora_A[n].shape[0]
                parts.append(u[:, i : i + r] @ self.lora_B[n].to(dt).t())
                i += r
            else:
                parts.append(x.new_zeros(x.shape[0], out))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)) * ctx.scaling_value

    def forward(self, h, cos, sin, ctx: "_Ctx") -> torch.Tensor:
        cfg = ctx.cfg
        T = h.shape[0]
        x = rms_norm(h, self.input_norm, cfg.rms_norm_eps)
        q, k, v = self.proj("qkv", x, ctx).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=1)
        q = apply_rope(q.reshape(T, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(T, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        attn = _attention(q, k, v, ctx.cu, cfg.sliding_window)
        h = h + self.proj("o", attn, ctx)
        x = rms_norm(h, self.post_norm, cfg.rms_norm_eps)
        gate, up = self.proj("gate_up", x, ctx).split([cfg.intermediate_size, cfg.intermediate_size], dim=1)
        return h + self.proj("down", F.silu(gate) * up, ctx)


@dataclass
class _Ctx:
    """What every layer of one forward shares."""

    cfg: ModelConfig
    cu: list
    meta: Optional[ops.LoRAMeta]
    scaling: Optional[torch.Tensor]
    scaling_value: float
    dropout: float


class TrainModel(nn.Module):
    """Differentiable decoder over packed sequences; see the module docstring.

    hidden(input_ids [T], cu_seqlens int32 [B + 1]) -> [T, d] before the final norm;
    lm_loss / embed turn those rows into a summed cross-entropy or pooled embeddings."""

    def __init__(self, cfg: ModelConfig, state_dict: dict, lora: Optional[LoRASpec] = None,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.config, self.lora = cfg, lora
        self.activation_checkpointing = activation_checkpointing
        full = lora is None
        sd = state_dict
        self.embed = nn.Parameter(sd["model.embed_tokens.weight"], requires_grad=full)
        self.norm = nn.Parameter(sd["model.norm.weight"], requires_grad=full)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(sd["lm_head.weight"], requires_grad=full)
        self.layers = nn.ModuleList(_Layer(cfg, sd, l, full, lora) for l in range(cfg.num_hidden_layers))
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(self.embed.device), persistent=False)
        if lora is not None:
            self.register_buffer("scaling", torch.tensor([lora.scaling], dtype=torch.float32,
                                                         device=self.embed.device), persistent=False)
        q, kv, i, d = cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.hidden_size
        self.module_shapes = {  # (in, out), as Backbone: what adapters.read_adapter checks against
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
        }  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str, lora: Optional[LoRASpec] = None, dtype: torch.dtype = torch.float32,
                        device="cpu", activation_checkpointing: bool = False) -> "TrainModel":
        path = resolve_model(path)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"no config.json in {path!r}: not a HF model directory")
        with open(cfg_path) as f:
            cfg = ModelConfig.from_hf(json.load(f))
        sd = load_state_dict(path, cfg, dtype, torch.device(device))
        return cls(cfg, sd, lora, activation_checkpointing)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # -- forward -----------------------------------------------------------------------

    def hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """[T, d] after the last layer, before the final norm (the LM head and ops.pool fuse it)."""
        cu = check_packed(input_ids, cu_seqlens)
        T, dev = cu[-1], self.device
        meta = scaling = None
        if self.lora is not None:
            meta = ops.LoRAMeta.build(torch.zeros(T, dtype=torch.int32, device=dev), 1)
            scaling = self.scaling
        ctx = _Ctx(self.config, cu, meta, scaling, self.lora.scaling if self.lora else 0.0,
                   self.lora.dropout if self.lora else 0.0)
        dt = _autocast_dtype(dev) or self.dtype
        cos, sin = rope_cos_sin(self.inv_freq, positions_from_cu_seqlens(cu, dev), dt)
        h = F.embedding(input_ids.to(dev), self.embed)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        return h

    def logits(self, h: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the given rows of hidden() (all rows when None)."""
        if rows is not None:
            h = h.index_select(0, rows)
        head = self.embed if self.lm_head is None else self.lm_head
        x = rms_norm(h, self.norm, self.config.rms_norm_eps)
        dt = _autocast_dtype(x.device) or head.dtype
        return F.linear(x.to(dt), head.to(dt))

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed fp32 cross-entropy, number of labelled rows): labels [T] hold the next
        token of each row or IGNORE; the LM head runs only on labelled rows."""
        rows = (labels != IGNORE).nonzero().squeeze(1)
        if rows.numel() == 0:
            return h.sum() * 0.0, 0
        logits = self.logits(h, rows).float()
        return F.cross_entropy(logits, labels.index_select(0, rows), reduction="sum"), int(rows.numel())

    def embed_sequences(self, h: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "last") -> torch.Tensor:
        """L2-normalised pooled embeddings [B, d] (final RMSNorm fused into ops.pool)."""
        return ops.pool(h, cu_seqlens.to(h.device), mode=pooling, normalize=True,
                        norm_weight=self.norm.to(h.dtype), eps=self.config.rms_norm_eps)

    # -- adapters and checkpoints ---------------------------------------------------------

    def lora_weights(self) -> dict:
        """{(layer, module): (A [r, in], B [out, r])} of the trainable LoRA."""
        return {(l, n): (layer.lora_A[n], layer.lora_B[n])
                for l, layer in enumerate(self.layers) for n in layer.lora_A}  # fmt: skip

    def load_lora(self, peft_dir: str) -> None:
        """Start from a PEFT adapter (e.g. a first-round retriever): its modules, ranks and
        alphas must match this model's LoRASpec."""
        if self.lora is None:
            raise ValueError("load_lora needs a model built in LoRA mode")
        info, weights = read_adapter(self, peft_dir, "init")
        mine = self.lora_weights()
        if set(weights) != set(mine):
            raise ValueError(f"{peft_dir}: adapter modules differ from the training targets {self.lora.targets}")
        bad = {k: v for k, v in info.modules.items() if v != (self.lora.r, self.lora.alpha) or info.use_rslora}
        if bad:
            raise ValueError(f"{peft_dir}: rank/alpha {next(iter(bad.values()))} differ from r={self.lora.r}, "
                             f"alpha={self.lora.alpha} (or use_rslora is set)")
        with torch.no_grad():
            for k, (A, B) in weights.items():
                mine[k][0].copy_(A)
                mine[k][1].copy_(B)

    def save_adapter(self, out_dir: str, base_model: Optional[str] = None) -> None:
        """PEFT directory loadable by peft.PeftModel.from_pretrained and Backbone.load_adapter."""
        if self.lora is None:
            raise ValueError("save_adapter needs a model built in LoRA mode")
        weights = self.lora_weights()
        modules = {k: (self.lora.r, self.lora.alpha) for k in weights}
        write_adapter(out_dir, weights, modules, len(self.layers), config={
            "base_model_name_or_path": base_model, "lora_dropout": self.lora.dropout})

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights under their HF names (merged QKV / gate_up split back)."""
        cfg = self.config
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head
        split = {"qkv": [cfg.q_size, cfg.kv_size, cfg.kv_size], "o": [cfg.hidden_size],
                 "gate_up": [cfg.intermediate_size] * 2, "down": [cfg.hidden_size]}  # fmt: skip
        parents = {"qkv": "self_attn", "o": "self_attn", "gate_up": "mlp", "down": "mlp"}
        for l, layer in enumerate(self.layers):
            p = f"model.layers.{l}."
            out[p + "input_layernorm.weight"] = layer.input_norm
            out[p + "post_attention_layernorm.weight"] = layer.post_norm
            for g, (w_name, b_name, mods) in layer.groups.items():
                for kind, t in (("weight", getattr(layer, w_name)), ("bias", getattr(layer, b_name))):
                    if t is None:
                        continue
                    for (name, _), part in zip(mods, t.split(split[g], 0)):
                        out[f"{p}{parents[g]}.{name}.{kind}"] = part
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def save_pretrained(self, out_dir: str, src_dir: str) -> None:
        """HF layout (config.json from src_dir, model.safetensors, tokenizer files copied)."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        src_dir = resolve_model(src_dir)
        with open(os.path.join(src_dir, "config.json")) as f:
            hf_cfg = json.load(f)
        hf_cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        save_file(self.hf_state_dict(), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
        copy_tokenizer(src_dir, out_dir)


def pack(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids int64 [T], cu_seqlens int32 [B + 1])."""
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return torch.tensor([t for s in seqs for t in s], dtype=torch.long), cu
