"""Backbone in training (full and LoRA) vs the references: Backbone and transformers (forward), transformers + peft
(LoRA gradients), transformers autograd (full-parameter gradients); save / load round trips."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from bsharedrag_fast import Backbone  # noqa: E402
from bsharedrag_fast.train import init_checkpoint  # noqa: E402
from bsharedrag_fast.model.backbone import ForwardContext, LoRASpec, TrainedLoRA  # noqa: E402
from tiny_models import hf_model, packed, peft_adapter, spans  # noqa: E402
from train_tiny import one_thread  # noqa: E402, F401  (autouse fixture)

LENS = [5, 1, 12, 7]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def case(request, tmp_path_factory):
    overrides = {"sliding_window": 6} if request.param == "mistral" else {}
    hf = hf_model(request.param, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, str(path), tmp_path_factory


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """One architecture for the tests whose code path does not depend on it."""
    hf = hf_model("llama")
    path = tmp_path_factory.mktemp("llama1")
    hf.save_pretrained(path)
    return hf, str(path), tmp_path_factory


def _full(path):
    """Every base weight trainable (continual pre-training)."""
    return Backbone.from_pretrained(path).requires_grad_(True)


def _lora(path, spec):
    """A trainable LoRA on the frozen base."""
    return Backbone.from_pretrained(path).add_lora(spec)


def _hf_logits(m, ids, cu):
    return torch.cat([m(input_ids=ids[s:e][None]).logits[0] for s, e in spans(cu)])


def _peft_param(pm, l, name, kind):
    parent = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return dict(pm.named_parameters())[f"base_model.model.model.layers.{l}.{parent}.{name}.{kind}.default.weight"]


def test_forward_matches_backbone_and_transformers(case):
    hf, path, _ = case
    ids, cu = packed(LENS)
    tm = _full(path)
    ours = tm.logits(tm.hidden(ids, cu))
    assert (ours - Backbone.from_pretrained(path)(ids, cu)).abs().max() < 1e-5
    with torch.no_grad():
        assert (ours - _hf_logits(hf, ids, cu)).abs().max() < 1e-4


def test_full_gradients_match_transformers(case):
    hf, path, _ = case
    ids, cu = packed(LENS)
    tm = _full(path)
    g = torch.randn(int(cu[-1]), hf.config.vocab_size, generator=torch.Generator().manual_seed(0))
    (tm.logits(tm.hidden(ids, cu)) * g).sum().backward()
    ref = hf_model_copy(hf)
    (_hf_logits(ref, ids, cu) * g).sum().backward()
    with torch.no_grad():  # our gradients under their HF names: hf_state_dict over the grads
        for p in tm.parameters():
            p.data = p.grad
    ours = tm.hf_state_dict()
    for name, p in ref.named_parameters():
        assert (ours[name] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7, name


def hf_model_copy(hf):
    import copy

    return copy.deepcopy(hf).train()


def test_lora_gradients_match_peft(case):
    _lora_gradients(*case, None)


def test_lora_gradients_match_peft_subset_of_modules(llama):
    _lora_gradients(*llama, ("q_proj", "v_proj", "up_proj"))


def _lora_gradients(hf, path, tmp, targets):
    ids, cu = packed(LENS)
    kw = {} if targets is None else {"target_modules": list(targets)}
    ad = tmp.mktemp("ad")
    pm = peft_adapter(hf, ad, seed=3, r=4, lora_alpha=8, lora_dropout=0.0, **kw).train()
    spec = LoRASpec(r=4, alpha=8.0, dropout=0.0, **({} if targets is None else {"targets": targets}))
    tm = _lora(path, spec)
    tm.load_lora(str(ad))
    assert [n for n, _ in tm.trainable_parameters()] == [n for n, _ in tm.named_parameters() if "lora_" in n]
    ours = tm.logits(tm.hidden(ids, cu))
    theirs = _hf_logits(pm, ids, cu)
    assert (ours - theirs).abs().max() < 1e-4
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    for (l, n), (A, B) in tm.lora_weights().items():
        for mine, kind in ((A, "lora_A"), (B, "lora_B")):
            ref = _peft_param(pm, l, n, kind).grad
            assert (mine.grad - ref).abs().max() <= 1e-4 * ref.abs().max(), (l, n, kind)


def test_lora_dropout_is_peft_formula(case):
    """peft: base(x) + scaling * lora_B(lora_A(dropout(x))). Replay the same dropout mask (same
    seed, the projection draws nothing else) through that formula; eval() turns dropout off."""
    _, path, _ = case
    tm = _lora(path, LoRASpec(r=4, alpha=8.0, dropout=0.3))
    layer = tm.layers[0]
    with torch.no_grad():
        for _, B in tm.lora_weights().values():
            B.normal_(0, 0.5)
    ids, cu = packed([6, 3])
    ctx = _ctx(tm, ids, cu)
    x = torch.randn(9, tm.config.hidden_size)
    for group, w, b, names in (("qkv", layer.qkv_weight, layer.qkv_bias, ("q_proj", "k_proj", "v_proj")),
                               ("gate_up", layer.gate_up_weight, layer.gate_up_bias, ("gate_proj", "up_proj"))):
        for training in (True, False):
            tm.train(training)
            torch.manual_seed(5)
            ours = layer.proj(group, x, ctx)
            torch.manual_seed(5)
            xd = torch.nn.functional.dropout(x, 0.3, training=training)
            upd = torch.cat([(xd @ layer.lora_A[n].t()) @ layer.lora_B[n].t() for n in names], 1) * 2.0
            ref = torch.nn.functional.linear(x, w, b) + upd
            assert (ours - ref).abs().max() < 1e-5, (group, training)


def _ctx(tm, ids, cu):
    """The per-forward context hidden() builds, for calling one projection directly."""
    from bsharedrag_fast import ops

    meta = ops.LoRAMeta.build(torch.zeros(ids.shape[0], dtype=torch.int32), 1)
    from bsharedrag_fast.model.attention import AttentionPlan

    return ForwardContext(torch.zeros(ids.shape[0], dtype=torch.long), AttentionPlan.packed(cu.tolist(), None),
                          trained=TrainedLoRA(meta, tm.lora_scaling, tm.lora_spec))


def test_activation_checkpointing_same_gradients(llama):
    _, path, _ = llama
    ids, cu = packed(LENS)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        tm = _lora(path, LoRASpec(r=4, alpha=8.0, dropout=0.1))
        tm.activation_checkpointing = ckpt
        with torch.no_grad():
            for _, B in tm.lora_weights().values():
                B.normal_(0, 0.1)
        tm.train()
        torch.manual_seed(1)
        tm.logits(tm.hidden(ids, cu)).square().mean().backward()
        grads.append([p.grad.clone() for _, p in tm.trainable_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_saved_adapter_loads_in_peft_and_backbone(case):
    hf, path, tmp = case
    ids, cu = packed(LENS)
    tm = _lora(path, LoRASpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "down_proj")))
    with torch.no_grad():
        for _, B in tm.lora_weights().values():
            B.normal_(0, 0.2)
        tm.eval()
        ours = tm.logits(tm.hidden(ids, cu))
    out = tmp.mktemp("saved")
    tm.save_lora(str(out), base_model=path)
    bb = Backbone.from_pretrained(path)
    bb.load_adapter(str(out), "a")
    assert (bb(ids, cu, adapters=["a"] * len(LENS)) - ours).abs().max() < 1e-5
    pm = peft.PeftModel.from_pretrained(hf_model_copy(hf).eval(), str(out)).eval()
    with torch.no_grad():
        assert (_hf_logits(pm, ids, cu) - ours).abs().max() < 1e-4


def test_saved_full_model_loads_in_transformers_and_backbone(case):
    _, path, tmp = case
    ids, cu = packed(LENS)
    tm = _full(path)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        ours = tm.logits(tm.hidden(ids, cu))
    out = tmp.mktemp("full")
    tm.save_pretrained(str(out), path)
    assert (Backbone.from_pretrained(str(out))(ids, cu) - ours).abs().max() < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (_hf_logits(hf, ids, cu) - ours).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_init_checkpoint_loads_everywhere(tmp_path, arch):
    cfg = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=arch == "Qwen2ForCausalLM")
    init_checkpoint(str(tmp_path), cfg, seed=3)
    ids, cu = packed([4, 6], vocab=64)
    ours = Backbone.from_pretrained(str(tmp_path))(ids, cu)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert (_hf_logits(hf, ids, cu) - ours).abs().max() < 1e-5
    w = hf.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.003 and torch.all(hf.model.norm.weight == 1)
    init_checkpoint(str(tmp_path / "again"), cfg, seed=3)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] in ("llama", "qwen2")


@pytest.mark.parametrize("cfg, match", [
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 8}, "missing"),
    ({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2}, "architectures or a model_type"),
    ({"architectures": ["GPT2LMHeadModel"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 2}, "unsupported architecture"),
])  # fmt: skip
def test_init_checkpoint_bad_config(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        init_checkpoint(str(tmp_path), cfg)


@pytest.mark.parametrize("kw, match", [({"r": 0}, "r must be"), ({"dropout": 1.0}, "dropout"),
                                       ({"targets": ("q_proj", "lm_head")}, "target modules")])
def test_lora_spec_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRASpec(**kw)


def test_load_lora_mismatch(llama):
    hf, path, tmp = llama
    ad = tmp.mktemp("r8")
    peft_adapter(hf, ad, seed=1, r=8, lora_alpha=8)
    tm = _lora(path, LoRASpec(r=4, alpha=8.0))
    with pytest.raises(ValueError, match="rank|differ"):
        tm.load_lora(str(ad))
    with pytest.raises(ValueError, match="trainable LoRA"):
        _full(path).load_lora(str(ad))
