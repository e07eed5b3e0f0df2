"""ops.DecoderStack (csrc/decoder.cpp, bsr_decoder_layers: every layer of a step in one call)
against its torch reference over GQA shapes, biases, sliding windows, scattered blocks and
every dtype; the engine's fused steps against the op-by-op path bit for bit (the same
kernels in the same order); when the model takes it and when not; bad input."""
from __future__ import annotations

import pytest
import torch

from bsharedrag_fast import ops

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}


def _weights(shape: ops.DecoderShape, L: int, bias: bool, dtype, g) -> list:
    out = []
    for _ in range(L):
        w = {}
        for name, dims in shape.weight_shapes().items():
            if name.endswith("_bias") and not bias:
                w[name] = None
            elif name.endswith("norm"):
                w[name] = (1 + 0.2 * torch.randn(dims, generator=g)).to(dtype)
            else:
                w[name] = (torch.randn(dims, generator=g) / dims[-1] ** 0.5).to(dtype)
        out.append(ops.LayerWeights(**w))
    return out


def _step(past, new, bs, num_blocks, g):
    """Block tables (scattered blocks), each new row's slot, cu_seqlens_q and context_lens."""
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, cu = [], [], [0]
    for p, n in zip(past, new):
        nb = -(-(p + n) // bs)
        tables.append([perm.pop() for _ in range(nb)])
        slots += [tables[-1][pos // bs] * bs + pos % bs for pos in range(p, p + n)]
        cu.append(cu[-1] + n)
    width = max(len(t) for t in tables)
    tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    lens = torch.tensor([p + n for p, n in zip(past, new)], dtype=torch.int32)
    return tab, torch.tensor(slots), torch.tensor(cu, dtype=torch.int32), lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KV,D,bias,window", [(4, 2, 6, False, None), (3, 3, 8, True, None), (6, 1, 4, True, 3)])
def test_decoder_stack_matches_its_reference(H, KV, D, bias, window, dtype):
    g = torch.Generator().manual_seed(H * 100 + D)
    shape = ops.DecoderShape(hidden_size=20, num_heads=H, num_kv_heads=KV, head_dim=D, intermediate_size=28,
                             eps=1e-5, window=window)
    L, bs, nblocks = 3, 4, 40
    layers = _weights(shape, L, bias, dtype, g)
    past, new = [0, 5, 9, 1], [3, 1, 1, 4]  # prefill of a fresh sequence, decode rows, a chunk over a past
    tables, slots, cu, lens = _step(past, new, bs, nblocks, g)
    T = sum(new)
    kc = [(torch.randn(nblocks, bs, KV, D, generator=g)).to(dtype) for _ in range(L)]  # pasts: whatever is there
    vc = [(torch.randn(nblocks, bs, KV, D, generator=g)).to(dtype) for _ in range(L)]
    h = torch.randn(T, 20, generator=g).to(dtype)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(past, new)])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = ops.rope_cos_sin(inv_freq, positions, dtype)
    kc_ref, vc_ref = [c.clone() for c in kc], [c.clone() for c in vc]
    want = ops.decoder_layers_reference(h, layers, shape, cos, sin, kc_ref, vc_ref, slots, tables, cu, lens)
    stack = ops.DecoderStack(layers, shape, kc, vc)
    h0 = h.clone()
    got = stack(h, cos, sin, slots, tables, cu, lens)
    assert torch.equal(h, h0)  # the input is not modified
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for a, b in zip(kc + vc, kc_ref + vc_ref):  # each layer's new k / v went to the same slots
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _engine_model(tmp_path, arch: str):
    from bsharedrag_fast import Backbone
    from tiny_models import hf_model

    hf_model(arch, embed_scale=4.0, **({"sliding_window": 6} if arch == "mistral" else {})).save_pretrained(tmp_path)
    return Backbone.from_pretrained(str(tmp_path))


def _count_calls(monkeypatch) -> list:
    calls = []
    real = ops.DecoderStack.__call__

    def spy(self, h, *a):
        calls.append(h.shape[0])
        return real(self, h, *a)

    monkeypatch.setattr(ops.DecoderStack, "__call__", spy)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # qwen2: qkv biases; mistral: a sliding window
def test_fused_engine_steps_equal_the_op_by_op_path_bit_for_bit(arch, tmp_path, monkeypatch):
    """Prefill then decode steps of 3 sequences: with FUSED_LAYERS "auto" the decode steps
    (and the short prefills) run as one DecoderStack call; logits equal the op-by-op path's."""
    from bsharedrag_fast.engine.kv_cache import KVCache
    from bsharedrag_fast.engine.step import run_step
    from bsharedrag_fast.model import backbone

    model = _engine_model(tmp_path, arch)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 9, 2)]

    def run(mode):
        monkeypatch.setattr(backbone, "FUSED_LAYERS", mode)
        cache = KVCache(model.config, 1 << 20, block_size=4)
        sids = [cache.allocate() for _ in prompts]
        out, last = [], []
        for sid, p in zip(sids, prompts):  # prefill one by one
            logits = run_step(model, torch.tensor(p), torch.tensor([0, len(p)], dtype=torch.int32), [sid], cache,
                              logits_rows=[len(p) - 1]).logits
            out.append(logits)
            last.append(int(logits[0].argmax()))
        for _ in range(7):  # decode all three together
            logits = run_step(model, torch.tensor(last), torch.tensor([0, 1, 2, 3], dtype=torch.int32), sids,
                              cache).logits
            out.append(logits)
            last = logits.argmax(-1).tolist()
        return out

    calls = _count_calls(monkeypatch)
    want = run("off")
    assert calls == []
    got = run("auto")
    assert calls == [5, 9, 2] + [3] * 7  # every step fused (all <= 16 rows, no adapters)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_steps_with_adapter_rows_cacheless_rows_or_autograd_are_not_fused(tmp_path, monkeypatch):
    from bsharedrag_fast.engine.kv_cache import KVCache
    from bsharedrag_fast.engine.step import run_step
    from tiny_models import LORA_TARGETS, hf_model, peft_adapter

    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "base")
    peft_adapter(hf, tmp_path / "ad", seed=1, r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    from bsharedrag_fast import Backbone

    model = Backbone.from_pretrained(str(tmp_path / "base"))
    model.load_adapter(str(tmp_path / "ad"), "ad")
    calls = _count_calls(monkeypatch)
    cache = KVCache(model.config, 1 << 20, block_size=4)
    a, b = cache.allocate(), cache.allocate()
    two = torch.tensor([0, 2, 4], dtype=torch.int32)
    run_step(model, torch.tensor([5, 6, 7, 8]), two, [a, b], cache, adapters=["ad", None])  # an adapter row
    assert calls == []
    run_step(model, torch.tensor([5, 6, 7, 8]), two, [a, None], cache)  # a cache-less row
    assert calls == []
    run_step(model, torch.tensor([9, 10]), torch.tensor([0, 1, 2], dtype=torch.int32), [a, b], cache)
    assert calls == [2]  # base rows only, all cached: fused
    with torch.no_grad():
        model.hidden(torch.tensor([1, 2, 3]), torch.tensor([0, 3], dtype=torch.int32))  # no cache: op by op
    assert calls == [2]
    model.float()  # .to() and friends may replace the weights the stack points at: it is rebuilt
    assert model._stack is None


def test_decoder_stack_checks_its_input():
    g = torch.Generator().manual_seed(0)
    shape = ops.DecoderShape(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=12, eps=1e-6)
    layers = _weights(shape, 2, False, torch.float32, g)
    kc = [torch.zeros(4, 2, 1, 4) for _ in range(2)]
    vc = [torch.zeros(4, 2, 1, 4) for _ in range(2)]
    bad = list(layers)
    bad[1] = bad[1]._replace(o_weight=torch.zeros(8, 5))
    with pytest.raises(ValueError, match=r"layers\[1\]\.o_weight"):
        ops.DecoderStack(bad, shape, kc, vc)
    with pytest.raises(ValueError, match=r"v_caches\[0\]"):
        ops.DecoderStack(layers, shape, kc, [torch.zeros(4, 2, 2, 4)] * 2)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.DecoderStack([w._replace(qkv_weight=w.qkv_weight.double()) for w in layers], shape, kc, vc)
    stack = ops.DecoderStack(layers, shape, kc, vc)
    cos, sin = ops.rope_cos_sin(torch.ones(2), torch.tensor([0]), torch.float32)
    tables, cu, lens = torch.tensor([[0]], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), \
        torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="h must be"):
        stack(torch.zeros(1, 8, dtype=torch.float64), cos, sin, torch.tensor([0]), tables, cu, lens)
    with pytest.raises(ValueError, match="slots"):
        stack(torch.zeros(1, 8), cos, sin, torch.tensor([0], dtype=torch.int32), tables, cu, lens)
    with pytest.raises(ValueError, match=r"slots\[0\] = 8 is outside"):  # the C++ check, as a ValueError
        stack(torch.zeros(1, 8), cos, sin, torch.tensor([8]), tables, cu, lens)
    assert torch.count_nonzero(kc[0]) == 0  # a refused call wrote nothing


def test_a_forced_kernel_backend_is_not_bypassed(tmp_path, monkeypatch):
    """KERNEL_BACKEND = "triton" (the GPU kernel under TRITON_INTERPRET, tests/test_graphs.py)
    must run the Triton attention, so such steps are not fused into the C++ stack."""
    import bsharedrag_fast.model.attention as attention
    from bsharedrag_fast.engine.kv_cache import KVCache
    from bsharedrag_fast.engine.step import build_step

    model = _engine_model(tmp_path, "llama")
    cache = KVCache(model.config, 1 << 20, block_size=4)
    sid = cache.allocate()
    h = torch.zeros(1, model.config.hidden_size)
    with torch.inference_mode():
        ctx = build_step(model, [0, 1], [sid], cache)
        assert model._fused_call(h, ctx) is not None
        monkeypatch.setattr(attention, "KERNEL_BACKEND", "triton")
        assert model._fused_call(h, ctx) is None
