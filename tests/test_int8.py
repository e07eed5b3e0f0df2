"""Weight-only int8 (per-output-row scales, fp32 activations): the quantizer, ops.linear's
int8 path (csrc bsr_linear_w8) against fp64 over odd shapes, the decoder stack's int8 entry
point against its reference, and a Backbone loaded with dtype=torch.int8 against the float32
model whose weights are the same dequantized values: logits, fused engine steps and adapters."""
from __future__ import annotations

import pytest
import torch

from bsharedrag_fast import ops
from bsharedrag_fast.ops import _backends
from bsharedrag_fast.ops.linear import W8_KERNEL_ROWS

needs_cpp = pytest.mark.skipif(_backends._import_cpp() is None, reason="the C++ extension is not built")


def test_quantize_int8_rounds_each_row_to_its_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=g) * torch.logspace(-3, 2, 7)[:, None]
    w[3] = 0.0
    q, scale = ops.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (7,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert scale[3] == 1.0 and not q[3].any()  # an all-zero row: scale 1, zeros
    err = (ops.dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())  # round to nearest
    for r in (0, 6):  # each row's largest |w| maps to +-127 exactly
        assert float(w[r].abs().max() / scale[r]) == pytest.approx(127.0)


def _fp64(x, q, scale, bias):
    y = x.double() @ (q.double() * scale.double()[:, None]).T
    return y if bias is None else y + bias.double()


@needs_cpp
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 33, W8_KERNEL_ROWS, W8_KERNEL_ROWS + 1, 130])
@pytest.mark.parametrize("k, n", [(1, 1), (17, 7), (67, 49), (300, 129)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_fp64(rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k + 3, generator=g)[:, 1:k + 1]  # strided rows
    q, scale = ops.quantize_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    want = _fp64(x, q, scale, b)
    for backend in ("cpp", "auto", "reference"):
        got = ops.linear(x, q, b, backend=backend, scale=scale)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1)).item()
        assert err < 2e-6, (backend, err)


@needs_cpp
def test_int8_kernel_rows_do_not_depend_on_their_batch():
    # the dot-product tile sums each output in an order that does not depend on the rows beside it
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g)
    q, scale = ops.quantize_int8(torch.randn(50, 96, generator=g))
    alone = torch.cat([ops.linear(x[i:i + 1], q, None, backend="cpp", scale=scale) for i in range(40)])
    for m in (5, 16, 40):
        assert torch.equal(ops.linear(x[:m], q, None, backend="cpp", scale=scale), alone[:m])


def test_int8_linear_bad_input_is_a_clear_error():
    q, scale = ops.quantize_int8(torch.randn(4, 6))
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="weight must be an int8"):
        ops.linear(x, q.float(), scale=scale)
    with pytest.raises(ValueError, match=r"scale must be a float32 \[4\]"):
        ops.linear(x, q, scale=scale[:3])
    with pytest.raises(ValueError, match=r"x must be a float \[T, 6\]"):
        ops.linear(torch.randn(2, 5), q, scale=scale)
    with pytest.raises(ValueError, match="onednn"):
        ops.linear(x, q, scale=scale, backend="onednn")


@needs_cpp
@pytest.mark.parametrize("bias", [False, True])
def test_int8_decoder_stack_matches_its_reference(bias):
    from test_decoder import _step, _weights

    g = torch.Generator().manual_seed(11)
    shape = ops.DecoderShape(hidden_size=20, num_heads=4, num_kv_heads=2, head_dim=6, intermediate_size=28, eps=1e-5)
    L, bs, nblocks, D = 3, 4, 40, 6
    layers, scales = [], []
    for w in _weights(shape, L, bias, torch.float32, g):
        parts = {p: ops.quantize_int8(getattr(w, p)) for p in ops.DecoderStack.PROJECTIONS}
        layers.append(w._replace(**{p: qs[0] for p, qs in parts.items()}))
        scales.append(ops.LayerScales(*(parts[p][1] for p in ops.DecoderStack.PROJECTIONS)))
    tables, slots, cu, lens = _step([0, 5, 1], [3, 1, 4], bs, nblocks, g)
    kc = [torch.randn(nblocks, bs, 2, D, generator=g) for _ in range(L)]
    vc = [torch.randn(nblocks, bs, 2, D, generator=g) for _ in range(L)]
    h = torch.randn(8, 20, generator=g)
    positions = torch.tensor([0, 1, 2, 5, 1, 2, 3, 4])
    cos, sin = ops.rope_cos_sin(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), positions, torch.float32)
    kc_ref, vc_ref = [c.clone() for c in kc], [c.clone() for c in vc]
    want = ops.decoder_layers_reference(h, layers, shape, cos, sin, kc_ref, vc_ref, slots, tables, cu, lens,
                                        scales=scales)
    got = ops.DecoderStack(layers, shape, kc, vc, scales)(h, cos, sin, slots, tables, cu, lens)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for a, b in zip(kc + vc, kc_ref + vc_ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"layers\[0\].qkv_weight must be a contiguous torch.int8"):
        ops.DecoderStack([w._replace(qkv_weight=w.qkv_weight.float()) for w in layers], shape, kc, vc, scales)
    with pytest.raises(ValueError, match="one entry per layer"):
        ops.DecoderStack(layers, shape, kc, vc, scales[:2])


def _dequantized_twin(model_int8, model_fp32) -> None:
    """Put the int8 model's dequantized weights into the float32 model (in place)."""
    with torch.no_grad():
        model_fp32.embed.copy_(ops.dequantize_int8(model_int8.embed, model_int8.embed_scale))
        if not model_fp32.config.tie_word_embeddings:
            model_fp32.lm_head.copy_(ops.dequantize_int8(model_int8.lm_head, model_int8.lm_head_scale))
        for a, b in zip(model_int8.layers, model_fp32.layers):
            for group in ("qkv", "o", "gate_up", "down"):
                w = getattr(b, f"{group}_weight")
                w.copy_(ops.dequantize_int8(getattr(a, f"{group}_weight"), getattr(a, f"{group}_scale")))


@pytest.fixture
def int8_pair(tmp_path):
    from tiny_models import hf_model

    from bsharedrag_fast import Backbone

    hf = hf_model("qwen2", embed_scale=4.0)  # qwen2: qkv biases (they stay float32)
    hf.save_pretrained(tmp_path)
    q = Backbone.from_pretrained(str(tmp_path), dtype=torch.int8)
    f = Backbone.from_pretrained(str(tmp_path))
    _dequantized_twin(q, f)
    return q, f, hf, tmp_path


@needs_cpp
def test_int8_backbone_equals_its_dequantized_float32_twin(int8_pair):
    from bsharedrag_fast.model.backbone import LoRASpec

    q, f, _, _ = int8_pair
    assert q.quantized and not f.quantized and q.dtype == torch.float32
    assert q.layers[0].qkv_weight.dtype == torch.int8 and q.layers[0].qkv_bias.dtype == torch.float32
    mem_q, mem_f = q.memory_report()["backbone"], f.memory_report()["backbone"]
    assert mem_q < 0.35 * mem_f  # int8 weights + fp32 scales, norms, biases
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (23,), generator=g)
    cu = torch.tensor([0, 9, 10, 23], dtype=torch.int32)
    torch.testing.assert_close(q(ids, cu), f(ids, cu), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="int8 weights are for inference"):
        q.add_lora(LoRASpec(r=4, alpha=8))
    with pytest.raises(ValueError, match="int8 weights are not saved"):
        q.hf_state_dict()


@needs_cpp
def test_int8_engine_steps_fused_and_with_adapters(int8_pair, monkeypatch):
    """Greedy generations of the engine on the int8 model, base rows (decode steps through the
    int8 decoder stack) and adapter rows, equal the float32 twin's."""
    from tiny_models import peft_adapter

    from bsharedrag_fast.engine.runtime import SharedRuntime

    q, f, hf, tmp_path = int8_pair
    peft_adapter(hf, tmp_path / "lora", seed=4)
    calls = []
    real = ops.DecoderStack.__call__
    monkeypatch.setattr(ops.DecoderStack, "__call__", lambda self, h, *a: calls.append(self.scales) or
                        real(self, h, *a))
    outs = []
    for model in (q, f):
        model.load_adapter(str(tmp_path / "lora"), "a")
        rt = SharedRuntime(model, None, max_length=128, speculate=0)
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 12, 3)]
        hs = []
        for a in (None, "a"):  # base rows alone first: their decode steps take the decoder stack
            hs += [rt.submit_generate(p, adapter=a, max_new_tokens=8, eos_token_id=[]) for p in prompts]
            rt.run_until_done()
        outs.append([h.result().token_ids for h in hs])
    assert outs[0] == outs[1]
    assert any(s is not None for s in calls)  # the int8 model's base decode steps ran as one C++ call
