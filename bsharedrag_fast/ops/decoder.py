"""Every layer of a decoder step in one C++ call: the decode path without Python between ops.

A decode step of one row on SmolLM2-135M streams ~540 MB of weights (about 20 ms on the
2-core EPYC) and, run op by op from Python, spent another 9 ms in the ~12 op calls of each
of its 30 layers (RMSNorm, merged linears, rotary, cache write, attention, SiLU-and-mul,
residual adds: 5-30 us each for a handful of rows). `DecoderStack` runs them all in one call
(csrc/decoder.cpp, bsr_decoder_layers) with the same kernels in the same order, so its
output equals the op-by-op path bit for bit (tests/test_decoder.py).

It covers what a base-model engine step is: every row a cached sequence's (its k / v go
into the paged cache, then it attends over it), no LoRA. The model takes it for such steps
on CPU when the dense kernel is the one ops.linear would pick for every projection at this
row count (`ops.linear.cpp_pays`: up to 16 fp32 rows on AVX2); other steps (adapter rows,
cache-less rows, autograd, prefill past that row count, CUDA) run op by op.

`decoder_layers_reference` is the same stack in torch ops (F.linear, the ops' references).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _backends
from .attention import paged_attention_reference
from .linear import dequantize_int8
from .rms_norm import rms_norm_reference
from .rope import rope_reference
from .silu_mul import silu_mul_reference


class LayerWeights(NamedTuple):
    """One layer's weights, q/k/v and gate/up merged (see bsr_layer_weights in bsharedrag.h)."""

    input_norm: torch.Tensor  # [d]
    qkv_weight: torch.Tensor  # [(H + 2 KV) D, d]: q rows, then k, then v
    qkv_bias: Optional[torch.Tensor]
    o_weight: torch.Tensor  # [d, H D]
    o_bias: Optional[torch.Tensor]
    post_norm: torch.Tensor  # [d]
    gate_up_weight: torch.Tensor  # [2 I, d]: gate rows, then up
    gate_up_bias: Optional[torch.Tensor]
    down_weight: torch.Tensor  # [d, I]
    down_bias: Optional[torch.Tensor]


class LayerScales(NamedTuple):
    """Per-row scales of one layer's int8 weights (see bsr_layer_scales in bsharedrag.h)."""

    qkv: torch.Tensor  # float32 [(H + 2 KV) D]
    o: torch.Tensor  # [d]
    gate_up: torch.Tensor  # [2 I]
    down: torch.Tensor  # [d]


@dataclass(frozen=True)
class DecoderShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    window: Optional[int] = None

    def weight_shapes(self) -> dict:
        d, D, I = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * D, self.num_kv_heads * D
        return {"input_norm": (d,), "qkv_weight": (q + 2 * kv, d), "qkv_bias": (q + 2 * kv,), "o_weight": (d, q),
                "o_bias": (d,), "post_norm": (d,), "gate_up_weight": (2 * I, d), "gate_up_bias": (2 * I,),
                "down_weight": (d, I), "down_bias": (d,)}


def decoder_layers_reference(h: torch.Tensor, layers: Sequence[LayerWeights], shape: DecoderShape,
                             cos: torch.Tensor, sin: torch.Tensor, k_caches: Sequence[torch.Tensor],
                             v_caches: Sequence[torch.Tensor], slots: torch.Tensor, block_tables: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                             scale: Optional[float] = None,
                             scales: Optional[Sequence[LayerScales]] = None) -> torch.Tensor:
    """The stack in torch: h [T, d] -> [T, d]; writes each layer's k / v into its cache at
    `slots`. cos / sin [T, D] as ops.rope_cos_sin gives them. scales: as DecoderStack's (int8
    projection weights, dequantized here)."""
    T = h.shape[0]
    H, KV, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    for li, (w, kc, vc) in enumerate(zip(layers, k_caches, v_caches)):
        if scales is not None:
            s = scales[li]
            w = w._replace(qkv_weight=dequantize_int8(w.qkv_weight, s.qkv), o_weight=dequantize_int8(w.o_weight, s.o),
                           gate_up_weight=dequantize_int8(w.gate_up_weight, s.gate_up),
                           down_weight=dequantize_int8(w.down_weight, s.down))
        x = rms_norm_reference(h, w.input_norm, shape.eps)
        qkv = F.linear(x, w.qkv_weight, w.qkv_bias)
        qk = rope_reference(qkv[:, : (H + KV) * D].view(T, H + KV, D), cos, sin)
        kc.view(-1, KV, D).index_copy_(0, slots, qk[:, H:])
        vc.view(-1, KV, D).index_copy_(0, slots, qkv[:, (H + KV) * D:].view(T, KV, D))
        attn = paged_attention_reference(qk[:, :H], kc, vc, block_tables, cu_seqlens_q, context_lens, shape.window,
                                         scale)
        h = h + F.linear(attn.reshape(T, H * D), w.o_weight, w.o_bias)
        x = rms_norm_reference(h, w.post_norm, shape.eps)
        h = h + F.linear(silu_mul_reference(F.linear(x, w.gate_up_weight, w.gate_up_bias)), w.down_weight,
                         w.down_bias)
    return h


def _check_tensor(name: str, t: Optional[torch.Tensor], want: tuple, dtype: torch.dtype, optional: bool = False):
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != want or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor {list(want)}, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")


class DecoderStack:
    """The layers' weights and KV caches, checked once, as the pointer table the C++ call
    reads (it holds the tensors, so the pointers stay valid while it lives). Call it once per
    step: stack(h, cos, sin, slots, block_tables, cu_seqlens_q, context_lens) -> new h.
    scales: one LayerScales per layer for int8 projection weights (bsr_decoder_layers_w8; the
    norms, biases, caches and rows float32), None for float weights."""

    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")

    def __init__(self, layers: Sequence[LayerWeights], shape: DecoderShape, k_caches: Sequence[torch.Tensor],
                 v_caches: Sequence[torch.Tensor], scales: Optional[Sequence[LayerScales]] = None):
        if not layers or len(layers) != len(k_caches) or len(k_caches) != len(v_caches):
            raise ValueError(f"layers, k_caches and v_caches must have the same length >= 1, got {len(layers)}, "
                             f"{len(k_caches)}, {len(v_caches)}")
        if scales is not None and len(scales) != len(layers):
            raise ValueError(f"scales must have one entry per layer ({len(layers)}), got {len(scales)}")
        dtype = torch.float32 if scales is not None else layers[0].qkv_weight.dtype
        if dtype not in self.DTYPES:
            raise ValueError(f"the decoder stack takes float32, float16 or bfloat16 weights, got {dtype}")
        want = shape.weight_shapes()
        kc0 = k_caches[0]
        cache_shape = (kc0.shape[0], kc0.shape[1], shape.num_kv_heads, shape.head_dim) if kc0.dim() == 4 else None
        rows, scale_rows = [], []
        for li, (w, kc, vc) in enumerate(zip(layers, k_caches, v_caches)):
            for name, t in w._asdict().items():
                wdt = torch.int8 if scales is not None and name in self.PROJECTIONS else dtype
                _check_tensor(f"layers[{li}].{name}", t, want[name], wdt, optional=name.endswith("_bias"))
            for name, c in (("k_caches", kc), ("v_caches", vc)):
                _check_tensor(f"{name}[{li}]", c, cache_shape or (-1,), dtype)
            rows.append([0 if t is None else t.data_ptr() for t in w] + [kc.data_ptr(), vc.data_ptr()])
            if scales is not None:
                for name, t in scales[li]._asdict().items():
                    _check_tensor(f"scales[{li}].{name}", t, want[name + "_weight"][:1], torch.float32)
                scale_rows.append([t.data_ptr() for t in scales[li]])
        self.layers, self.k_caches, self.v_caches = list(layers), list(k_caches), list(v_caches)
        self.scales = None if scales is None else list(scales)
        self.shape, self.dtype = shape, dtype
        self.num_blocks, self.block_size = kc0.shape[0], kc0.shape[1]
        self.table = torch.tensor(rows, dtype=torch.int64)  # [L, 12]: bsr_layer_weights, field by field
        # [L, 4]: bsr_layer_scales, field by field
        self.scale_table = None if scales is None else torch.tensor(scale_rows, dtype=torch.int64)
        self.scale = 1.0 / math.sqrt(shape.head_dim)  # as ops.paged_attention's default

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        s = self.shape
        T, D = h.shape[0], s.head_dim
        if h.dtype != self.dtype or h.dim() != 2 or h.shape[1] != s.hidden_size or h.device.type != "cpu":
            raise ValueError(f"h must be a {self.dtype} CPU tensor [T, {s.hidden_size}], got {h.dtype} "
                             f"{list(h.shape)} on {h.device}")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dtype != self.dtype or tuple(t.shape) != (T, D) or t.stride(1) != 1 or t.stride(0) != cos.stride(0):
                raise ValueError(f"{name} must be {self.dtype} [{T}, {D}] with unit column stride (rows as cos's)")
        if slots.dtype != torch.int64 or tuple(slots.shape) != (T,):
            raise ValueError(f"slots must be int64 [{T}], got {slots.dtype} {list(slots.shape)}")
        for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q),
                        ("context_lens", context_lens)):
            if t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32, got {t.dtype}")
        B = context_lens.shape[0]
        if tuple(cu_seqlens_q.shape) != (B + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != B:
            raise ValueError(f"cu_seqlens_q must be [{B + 1}] and block_tables [{B}, max_blocks] for {B} context_lens")
        out = h.clone(memory_format=torch.contiguous_format)
        slots, tables = slots.contiguous(), block_tables.contiguous()
        cu, lens = cu_seqlens_q.contiguous(), context_lens.contiguous()
        # the kernel takes the halves' cos / sin [T, D / 2]: cos's first half, sin's second (its unnegated half)
        _backends.cpp().decoder_layers(
            _backends.CPP_DTYPES[self.dtype], s.hidden_size, s.num_heads, s.num_kv_heads, D, s.intermediate_size,
            s.eps, s.window or 0, self.scale, self.table.data_ptr(), len(self.layers), out.data_ptr(), T,
            cos.data_ptr(), sin.data_ptr() + (D // 2) * sin.element_size(), cos.stride(0), slots.data_ptr(),
            self.num_blocks, self.block_size, tables.data_ptr(), tables.stride(0), cu.data_ptr(), lens.data_ptr(), B,
            0 if self.scale_table is None else self.scale_table.data_ptr(),
        )  # fmt: skip
        return out
