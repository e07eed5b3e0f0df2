"""Pooled embedding over packed sequences: last / mean / cls, with the final RMSNorm and L2 norm fused.

In a mixed batch the embedding rows are packed sequences without padding, described by
cu_seqlens. The fused op reads only what it needs: for last/cls pooling the pooled
row of each sequence (the final RMSNorm is applied to that row alone); for mean pooling
each token is RMS-normalised (as the unfused model would) and averaged, in one pass in
fp32, then the result is L2-normalised. A zero vector normalises to zero, never NaN.

Backward: on the Triton backend a fused kernel (kernels/pool.py); on CPU the few rows
involved (B pooled rows, or every row for mean) are recomputed with torch and
differentiated. Nothing beyond the inputs is saved by the forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..util.pool_modes import MODES, POOL_MODES
from . import _backends

L2_EPS = 1e-12  # F.normalize's: a zero vector stays zero

# Measured by benchmarks/bench_pool.py: the C++ kernel beats the torch sequence on CPU.
CPU_AUTO_BACKEND = "cpp"

def _check_args(hidden, cu_seqlens, mode, norm_weight, eps) -> list:
    """Validate; returns cu_seqlens as a host list (one sync, B + 1 values)."""
    _backends.check_float_matrix("hidden", hidden, "[T, d]")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be int32 [B + 1] with B >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens must be on {hidden.device} (the device of hidden), got {cu_seqlens.device}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != hidden.shape[0]:
        raise ValueError(f"cu_seqlens must end at T = {hidden.shape[0]} (rows of hidden), got {cu[-1]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] <= cu[b]:
            raise ValueError(
                f"cu_seqlens must be strictly increasing (no zero-length sequences): "
                f"sequence {b} spans [{cu[b]}, {cu[b + 1]})"
            )
    if norm_weight is not None:
        if not isinstance(norm_weight, torch.Tensor) or tuple(norm_weight.shape) != (hidden.shape[1],):
            shape = tuple(norm_weight.shape) if isinstance(norm_weight, torch.Tensor) else type(norm_weight).__name__
            raise ValueError(f"norm_weight must be a tensor [{hidden.shape[1]}], got {shape}")
        if norm_weight.dtype != hidden.dtype or norm_weight.device != hidden.device:
            raise ValueError(
                f"norm_weight must be {hidden.dtype} on {hidden.device} (as hidden), "
                f"got {norm_weight.dtype} on {norm_weight.device}"
            )
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return cu


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(h.dtype)


def pool_reference(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str = "last",
    normalize: bool = True,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The unfused torch sequence (norm every token, gather / segment mean, normalise), in fp32."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    cu = cu_seqlens.long()
    if mode == "mean":
        h = hidden.to(acc)
        if norm_weight is not None:
            h = _rms(h, norm_weight, eps)
        lens = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=hidden.device), lens)
        v = torch.zeros(lens.shape[0], hidden.shape[1], dtype=acc, device=hidden.device)
        v = v.index_add(0, seq, h) / lens.unsqueeze(1).to(acc)
    else:
        rows = cu[1:] - 1 if mode == "last" else cu[:-1]
        v = hidden.index_select(0, rows).to(acc)
        if norm_weight is not None:
            v = _rms(v, norm_weight, eps)
    if normalize:
        v = F.normalize(v, dim=-1, eps=L2_EPS)
    return v.to(hidden.dtype)


def _kernel_inputs(hidden, cu_seqlens, norm_weight):
    """What both kernels take: unit stride within a row (any row stride), contiguous vectors."""
    h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    return h, cu_seqlens.contiguous(), None if norm_weight is None else norm_weight.contiguous()


def _pool_fast(backend, hidden, cu_seqlens, mode, normalize, norm_weight, eps) -> torch.Tensor:
    out = torch.empty(cu_seqlens.shape[0] - 1, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    h, cu, w = _kernel_inputs(hidden, cu_seqlens, norm_weight)
    if backend == "triton":
        _backends.kernels().pool_forward(h, cu, POOL_MODES[mode], w, float(eps), bool(normalize), out)
        return out
    _backends.cpp().pool(
        _backends.CPP_DTYPES[h.dtype], h.data_ptr(), h.stride(0), h.shape[0], h.shape[1],
        cu.data_ptr(), out.shape[0], POOL_MODES[mode],
        0 if w is None else w.data_ptr(), float(eps), bool(normalize), out.data_ptr(), out.stride(0),
    )  # fmt: skip
    return out


class PoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, norm_weight, cu_seqlens, mode, normalize, eps, backend):
        ctx.save_for_backward(hidden, norm_weight, cu_seqlens)
        ctx.mode, ctx.normalize, ctx.eps, ctx.backend = mode, normalize, eps, backend
        return _pool_fast(backend, hidden, cu_seqlens, mode, normalize, norm_weight, eps)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, norm_weight, cu_seqlens = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if ctx.backend == "triton":
            h, cu, w = _kernel_inputs(hidden, cu_seqlens, norm_weight)
            dh = torch.empty_like(h)
            dw = torch.empty(h.shape[1], dtype=torch.float32, device=h.device) if need_w else None
            g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
            _backends.kernels().pool_backward(h, cu, POOL_MODES[ctx.mode], w, float(ctx.eps), bool(ctx.normalize), g, dh, dw)
            return dh, None if dw is None else dw.to(norm_weight.dtype), None, None, None, None, None
        w = None if norm_weight is None else norm_weight.detach().requires_grad_(need_w)
        with torch.enable_grad():
            if ctx.mode == "mean":
                h = hidden.detach().requires_grad_(True)
                v = pool_reference(h, cu_seqlens, "mean", ctx.normalize, w, ctx.eps)
            else:
                # only the pooled rows carry gradient: recompute those B rows alone
                cu = cu_seqlens.long()
                rows = cu[1:] - 1 if ctx.mode == "last" else cu[:-1]
                h = hidden.detach().index_select(0, rows).requires_grad_(True)
                one_per_seq = torch.arange(rows.shape[0] + 1, dtype=torch.int32, device=h.device)
                v = pool_reference(h, one_per_seq, "last", ctx.normalize, w, ctx.eps)
            inputs = [t for t in (h, w) if t is not None and t.requires_grad]
            grads = torch.autograd.grad(v, inputs, grad_out) if inputs else ()
        grads = list(grads)
        dh = grads.pop(0) if need_h else None
        dw = grads.pop(0) if need_w and w is not None else None
        if dh is not None and ctx.mode != "mean":
            dh = torch.zeros_like(hidden).index_copy_(0, rows, dh)
        return dh, dw, None, None, None, None, None


def pool(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str = "last",
    normalize: bool = True,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool packed sequences into one vector each: hidden [T, d], cu_seqlens int32 [B + 1] -> [B, d].

    mode: "last" (the sequence's last row, RepLLaMA with EOS appended), "mean", or "cls"
    (its first row). norm_weight fuses the backbone's final RMSNorm (pass the raw hidden
    states before the norm); normalize L2-normalises. Differentiable w.r.t. hidden and
    norm_weight.
    """
    _check_args(hidden, cu_seqlens, mode, norm_weight, eps)
    backend = _backends.resolve(backend, hidden.device, hidden.dtype, CPU_AUTO_BACKEND)
    if backend == "reference":
        return pool_reference(hidden, cu_seqlens, mode, normalize, norm_weight, eps)
    grads = torch.is_grad_enabled() and (
        hidden.requires_grad or (norm_weight is not None and norm_weight.requires_grad)
    )
    if grads:
        return PoolFunction.apply(hidden, norm_weight, cu_seqlens, mode, normalize, eps, backend)
    return _pool_fast(backend, hidden, cu_seqlens, mode, normalize, norm_weight, eps)
