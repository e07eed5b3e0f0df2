"""Multi-LoRA linear: y = x W^T + b + scaling[a] * (x A_a^T) B_a^T for rows with adapter a >= 0.

One frozen base weight, L stacked adapters, and a batch whose rows each pick an
adapter (or -1 for none). The base GEMM is torch's (cuBLAS / MKL), always over the
whole batch, so rows with -1 are bit-identical to F.linear; the LoRA part is a
shrink (x A^T, fp32 accumulation) into a [num_lora, r] buffer and an expand that adds
scaling * v B^T into the base output in place, over the adapters' sorted segments.

Backward reuses the same two kernels on transposed adapters:
  dv = dy B_a (shrink with B_a^T),  dx += scaling * dv A_a (expand with A_a^T),
and the weight gradients are one GEMM per active adapter over its segment:
  dA_a = scaling * dv^T x,  dB_a = scaling * dy^T v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from . import _backends
from .lora_meta import LoRAMeta

# Measured by benchmarks/bench_lora_linear.py (backend column): on CPU the C++ segment
# kernels beat torch's per-adapter gather + GEMM at every benchmarked shape.
CPU_AUTO_BACKEND = "cpp"

MAX_TRITON_RANK = 128

# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the dtype of x), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")


def _check_args(x, weight, bias, lora_a, lora_b, scaling) -> None:
    _backends.check_float_matrix("x", x, "[T, in]")
    _check_tensor("weight", weight, 2, x.dtype, x.device)
    out_f, in_f = weight.shape
    if in_f != x.shape[1]:
        raise ValueError(f"weight must be [out, {x.shape[1]}] to match x [T, in], got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must be [{out_f}], got {tuple(bias.shape)}")
    _check_lora(x, out_f, lora_a, lora_b, scaling)


def _check_lora(x, out_f: int, lora_a, lora_b, scaling) -> None:
    dt, dev, in_f = x.dtype, x.device, x.shape[1]
    _check_tensor("lora_a", lora_a, 3, dt, dev)
    _check_tensor("lora_b", lora_b, 3, dt, dev)
    n_ad, rank = lora_a.shape[0], lora_a.shape[1]
    if rank < 1:
        raise ValueError(f"lora_a must have rank >= 1, got shape {tuple(lora_a.shape)}")
    if lora_a.shape[2] != in_f:
        raise ValueError(f"lora_a must be [L, r, {in_f}], got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n_ad, out_f, rank):
        raise ValueError(f"lora_b must be [{n_ad}, {out_f}, {rank}] (L, out, r), got {tuple(lora_b.shape)}")
    if not isinstance(scaling, torch.Tensor):
        raise ValueError(f"scaling must be a torch.Tensor, got {type(scaling).__name__}")
    if scaling.dtype != torch.float32 or tuple(scaling.shape) != (n_ad,):
        raise ValueError(f"scaling must be float32 [{n_ad}], got {scaling.dtype} {tuple(scaling.shape)}")
    if scaling.device != dev:
        raise ValueError(f"scaling must be on {dev} (the device of x), got {scaling.device}")


def _as_meta(meta_or_token_adapter, x: torch.Tensor, num_adapters: int) -> LoRAMeta:
    if isinstance(meta_or_token_adapter, LoRAMeta):
        meta = meta_or_token_adapter
    else:
        meta = LoRAMeta.build(meta_or_token_adapter, num_adapters)
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"token_adapter has {meta.num_tokens} rows but x has {x.shape[0]}")
    if meta.num_adapters != num_adapters:
        raise ValueError(f"meta was built for {meta.num_adapters} adapters but lora_a holds {num_adapters}")
    if meta.device != x.device:
        raise ValueError(f"token_adapter must be on {x.device} (the device of x), got {meta.device}")
    return meta


# ----------------------------------------------------------------------------- kernels


def _shrink(backend: str, x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """v[p] = x[sorted_idx[p]] A_a^T accumulated in fp32; lora_a may be a strided view."""
    rank = lora_a.shape[1]
    if backend == "triton":
        v = torch.empty(meta.num_lora, rank, dtype=torch.float32, device=x.device)
        _backends.kernels().lora_shrink(
            x, lora_a, meta.sorted_idx, meta.starts, meta.counts, meta.active, meta.max_count, v
        )
        return v
    lora_a = lora_a.contiguous()
    v = torch.empty(meta.num_lora, rank, dtype=torch.float32)
    _backends.cpp().lora_shrink(
        _backends.CPP_DTYPES[x.dtype], x.data_ptr(), x.stride(0), x.shape[1],
        lora_a.data_ptr(), lora_a.shape[0], rank,
        meta.sorted_idx.data_ptr(), meta.counts.data_ptr(), meta.starts.data_ptr(), v.data_ptr(),
    )  # fmt: skip
    return v


def _expand(backend: str, v: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
            meta: LoRAMeta, y: torch.Tensor) -> None:
    """y[sorted_idx[p]] += scaling[a] * v[p] B_a^T in place; lora_b may be a strided view."""
    if backend == "triton":
        _backends.kernels().lora_expand(
            v, lora_b, scaling, meta.sorted_idx, meta.starts, meta.counts, meta.active, meta.max_count, y
        )
        return
    lora_b = lora_b.contiguous()
    _backends.cpp().lora_expand(
        _backends.CPP_DTYPES[y.dtype], v.data_ptr(), v.shape[1],
        lora_b.data_ptr(), lora_b.shape[0], lora_b.shape[1], scaling.data_ptr(),
        meta.sorted_idx.data_ptr(), meta.counts.data_ptr(), meta.starts.data_ptr(),
        y.data_ptr(), y.stride(0),
    )  # fmt: skip


def _forward(backend, x, weight, bias, lora_a, lora_b, scaling, meta):
    y = F.linear(x, weight, bias)
    if meta.no_lora:
        return y, None
    x = _backends.dense_rows(x)
    v = _shrink(backend, x, lora_a, meta)
    _expand(backend, v, lora_b, scaling, meta, y)
    return y, v


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, meta, backend):
        y, v = _forward(backend, x, weight, bias, lora_a, lora_b, scaling, meta)
        ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, v)
        ctx.meta, ctx.backend, ctx.has_bias = meta, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, scaling, v = ctx.saved_tensors
        meta, backend = ctx.meta, ctx.backend
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy = _backends.dense_rows(dy)
        dx = dw = db = da = dbb = None
        if need_x:
            dx = dy.mm(weight)
        if need_w:
            dw = dy.t().mm(x)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        if (need_a or need_bb) and meta.no_lora:
            da, dbb = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        if meta.no_lora or not (need_x or need_a or need_bb):
            return dx, dw, db, da, dbb, None, None, None
        dv = _shrink(backend, dy, lora_b.transpose(1, 2), meta)  # [num_lora, r] = dy B_a (unscaled)
        if need_x:
            _expand(backend, dv, lora_a.transpose(1, 2), scaling, meta, dx)
        if need_a or need_bb:
            da, dbb = _adapter_grads(x, dy, v, dv, scaling, meta, need_a, need_bb, lora_a, lora_b)
        return dx, dw, db, da, dbb, None, None, None


def _adapter_grads(x, dy, v, dv, scaling, meta, need_a, need_b, lora_a, lora_b):
    """dA_a = s_a dv^T x and dB_a = s_a dy^T v: one GEMM per active adapter over its segment."""
    acc = v.dtype
    idx = meta.sorted_idx.long()
    xs = x.index_select(0, idx).to(acc) if need_a else None
    dys = dy.index_select(0, idx).to(acc) if need_b else None
    s = scaling.to(acc)
    da = torch.zeros(lora_a.shape, dtype=acc, device=x.device) if need_a else None
    dbb = torch.zeros(lora_b.shape, dtype=acc, device=x.device) if need_b else None
    for a in meta.active_list:
        seg = slice(meta.starts_list[a], meta.starts_list[a] + meta.counts_list[a])
        if need_a:
            torch.mm(dv[seg].t(), xs[seg], out=da[a]).mul_(s[a])
        if need_b:
            torch.mm(dys[seg].t(), v[seg], out=dbb[a]).mul_(s[a])
    return (
        da.to(lora_a.dtype) if need_a else None,
        dbb.to(lora_b.dtype) if need_b else None,
    )


# ----------------------------------------------------------------------------- public


def _fast_backend(backend: str, x: torch.Tensor, lora_a: torch.Tensor) -> str:
    """Resolve `backend` for these inputs (the Triton kernels also bound the rank)."""
    backend = _backends.resolve(backend, x.device, x.dtype, CPU_AUTO_BACKEND)
    if backend == "triton" and lora_a.shape[1] > MAX_TRITON_RANK:
        raise ValueError(f"lora_a rank {lora_a.shape[1]} exceeds the Triton kernels' limit of {MAX_TRITON_RANK}")
    return backend


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    meta_or_token_adapter: Union[LoRAMeta, torch.Tensor],
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-LoRA linear layer over a batch whose rows each use their own adapter.

    x [T, in]; weight [out, in] (frozen base); bias [out] or None; lora_a [L, r, in];
    lora_b [L, out, r]; scaling float32 [L]; a LoRAMeta (build it once per step and pass it
    to every layer) or an int32 [T] token->adapter map (-1 = base only).
    Differentiable w.r.t. x, lora_a and lora_b (and weight/bias if they require grad).
    """
    _check_args(x, weight, bias, lora_a, lora_b, scaling)
    meta = _as_meta(meta_or_token_adapter, x, lora_a.shape[0])
    backend = _fast_backend(backend, x, lora_a)
    if backend == "reference":
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, meta.token_adapter)
    tensors = (x, weight, bias, lora_a, lora_b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, meta, backend)
    return _forward(backend, x, weight, bias, lora_a, lora_b, scaling, meta)[0]


def add_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    meta: LoRAMeta,
    backend: str = "auto",
) -> torch.Tensor:
    """Inference only: add the LoRA update in place into a base output y [T, out] computed
    elsewhere (e.g. one GEMM over a merged QKV weight, then one call per slice). Returns y."""
    _backends.check_float_matrix("x", x, "[T, in]")
    _check_tensor("y", y, 2, x.dtype, x.device)
    if y.shape[0] != x.shape[0] or y.stride(-1) != 1:
        raise ValueError(f"y must be [{x.shape[0]}, out] with unit last stride, got {tuple(y.shape)} {y.stride()}")
    _check_lora(x, y.shape[1], lora_a, lora_b, scaling)
    meta = _as_meta(meta, x, lora_a.shape[0])
    backend = _fast_backend(backend, x, lora_a)
    if backend == "reference":
        return y.copy_(_add_lora_reference(y, x, lora_a, lora_b, scaling, meta.token_adapter))
    if not meta.no_lora:
        _expand(backend, _shrink(backend, _backends.dense_rows(x), lora_a, meta), lora_b, scaling, meta, y)
    return y


@dataclass(frozen=True)
class LoRASlice:
    """One target module of a merged projection (q of q/k/v, gate of gate/up): its rows of the
    stacked A are lora_a[:, rank_offset:rank_offset + r], its B lora_b [L, out, r] (contiguous),
    its scalings [L], and it adds into the columns [out_start, out_start + out) of y."""

    rank_offset: int
    lora_b: torch.Tensor
    scaling: torch.Tensor
    out_start: int

    @property
    def rank(self) -> int:
        return self.lora_b.shape[2]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[1]


class MergedLoRA:
    """The adapters of one merged projection (q/k/v or gate/up, or a single module), checked
    once here so the per-step call is cheap: lora_a [L, R, in] holds every module's A stacked
    along the rank, and each LoRASlice names its rows of it, its B and scalings, and its
    output columns. add_ runs ONE shrink over lora_a and ONE expand writing every slice's
    columns (vLLM's merged-projection LoRA)."""

    def __init__(self, lora_a: torch.Tensor, slices: Sequence[LoRASlice]):
        if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3 or not lora_a.is_floating_point():
            raise ValueError(f"lora_a must be a float tensor [L, R, in], got {getattr(lora_a, 'shape', lora_a)!r}")
        L, R, _ = lora_a.shape
        dt, dev = lora_a.dtype, lora_a.device
        for i, s in enumerate(slices):
            _check_tensor(f"slices[{i}].lora_b", s.lora_b, 3, dt, dev)
            if s.lora_b.shape[0] != L or s.rank < 1 or not 0 <= s.rank_offset <= R - s.rank or s.out_start < 0:
                raise ValueError(f"slices[{i}]: lora_b {tuple(s.lora_b.shape)} at rank offset {s.rank_offset} "
                                 f"and column {s.out_start} does not fit lora_a {tuple(lora_a.shape)}")
            if s.scaling.dtype != torch.float32 or tuple(s.scaling.shape) != (L,) or s.scaling.device != dev:
                raise ValueError(f"slices[{i}].scaling must be float32 [{L}] on {dev}")
        self.lora_a = lora_a if dev.type != "cpu" else lora_a.contiguous()
        self.slices = tuple(LoRASlice(s.rank_offset, s.lora_b.contiguous(), s.scaling, s.out_start) for s in slices)
        self.num_adapters, self.in_features = L, lora_a.shape[2]
        self.out_end = max((s.out_start + s.out_features for s in self.slices), default=0)
        # the C ABI's per-slice arrays, built once (the tensors above keep the pointers valid)
        self._cpp_args = ([s.rank_offset for s in self.slices], [s.rank for s in self.slices],
                          [s.lora_b.data_ptr() for s in self.slices], [s.out_start for s in self.slices],
                          [s.out_features for s in self.slices], [s.scaling.data_ptr() for s in self.slices])

    def add_(self, y: torch.Tensor, x: torch.Tensor, meta: LoRAMeta, backend: str = "auto") -> torch.Tensor:
        """y[t, slice columns] += scaling * (x[t] A^T) B^T for rows with an adapter, in place
        (inference only); y is the base output [T, >= the last slice's end]. Returns y."""
        if (x.dtype != self.lora_a.dtype or y.dtype != x.dtype or x.dim() != 2 or x.shape[1] != self.in_features
                or y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] < self.out_end or y.stride(-1) != 1
                or x.device != self.lora_a.device or y.device != x.device):
            raise ValueError(f"x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype} (unit last stride) "
                             f"must match the adapters' [L, R, {self.in_features}] {self.lora_a.dtype} on "
                             f"{self.lora_a.device} and reach column {self.out_end}")
        meta = _as_meta(meta, x, self.num_adapters)
        if meta.no_lora or not self.slices:
            return y
        backend = _fast_backend(backend, x, self.lora_a)
        if backend == "reference":
            for s in self.slices:
                cols = y[:, s.out_start : s.out_start + s.out_features]
                a = self.lora_a[:, s.rank_offset : s.rank_offset + s.rank]
                cols.copy_(_add_lora_reference(cols, x, a, s.lora_b, s.scaling, meta.token_adapter))
            return y
        v = _shrink(backend, _backends.dense_rows(x), self.lora_a, meta)
        if backend == "triton":  # one launch per slice (strided views of v and y)
            for s in self.slices:
                _expand(backend, v[:, s.rank_offset : s.rank_offset + s.rank], s.lora_b, s.scaling, meta,
                        y[:, s.out_start : s.out_start + s.out_features])
            return y
        _backends.cpp().lora_expand_slices(
            _backends.CPP_DTYPES[y.dtype], v.data_ptr(), v.shape[1], *self._cpp_args, self.num_adapters,
            meta.sorted_idx.data_ptr(), meta.counts.data_ptr(), meta.starts.data_ptr(), y.data_ptr(), y.shape[1],
            y.stride(0),
        )  # fmt: skip
        return y


def add_lora_slices_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    slices: Sequence[LoRASlice],
    meta: LoRAMeta,
    backend: str = "auto",
) -> torch.Tensor:
    """Inference only: the LoRAs of a merged projection added in place into its base output
    y [T, out_total]; see MergedLoRA (build one once to call it every step). Returns y."""
    _backends.check_float_matrix("x", x, "[T, in]")
    if lora_a.dtype != x.dtype or lora_a.device != x.device or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a must be [L, R, {x.shape[1]}] {x.dtype} on {x.device} (as x), got "
                         f"{tuple(lora_a.shape)} {lora_a.dtype} on {lora_a.device}")
    merged = MergedLoRA(lora_a, slices)
    if merged.out_end > y.shape[1]:
        raise ValueError(f"the slices reach column {merged.out_end} but y is {tuple(y.shape)}: they do not fit")
    return merged.add_(y, x, meta, backend)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    token_adapter: torch.Tensor,
) -> torch.Tensor:
    """Plain torch, differentiable by autograd: per-adapter gather, two GEMMs in fp32, scatter."""
    return _add_lora_reference(F.linear(x, weight, bias), x, lora_a, lora_b, scaling, token_adapter)


def _add_lora_reference(y, x, lora_a, lora_b, scaling, token_adapter) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for a in range(lora_a.shape[0]):
        rows = (token_adapter == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        delta = (x[rows].to(acc) @ lora_a[a].to(acc).t()) @ lora_b[a].to(acc).t() * scaling[a].to(acc)
        y = y.index_put((rows,), (y[rows].to(acc) + delta).to(y.dtype))
    return y
