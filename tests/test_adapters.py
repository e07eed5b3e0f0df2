"""PEFT LoRA adapters on the Backbone: parity with peft, round trips, hot-load, atomicity.

Every model and adapter is tiny, random and built in tmp dirs (nothing is downloaded).
peft initialises lora_B to zero, so every adapter here gets random lora_A and lora_B.
"""
import copy
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bsharedrag_fast import Backbone  # noqa: E402
from bsharedrag_fast.model import adapters  # noqa: E402
from bsharedrag_fast.model.adapters import lora_nbytes  # noqa: E402
from tiny_models import LORA_TARGETS as ALL  # noqa: E402
from tiny_models import hf_model, packed, peft_adapter, randomize_lora, spans  # noqa: E402

TOL = 1e-4
LENS = [5, 1, 12, 7]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations via peft


@torch.no_grad()
def _peft_logits(pm, ids, cu, names):
    """Per sequence: names[b] is a peft adapter name, or None for the base model."""
    out = []
    for (s, e), n in zip(spans(cu), names):
        x = ids[s:e][None]
        if n is None:
            with pm.disable_adapter():
                out.append(pm(input_ids=x).logits[0])
        else:
            pm.set_adapter(n)
            out.append(pm(input_ids=x).logits[0])
    return torch.cat(out)


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def arch_case(request, tmp_path_factory):
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(f"base-{request.param}")
    hf.save_pretrained(path)
    return request.param, hf, Backbone.from_pretrained(path), tmp_path_factory


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    hf = hf_model("qwen2")
    path = tmp_path_factory.mktemp("base-qwen2")
    hf.save_pretrained(path)
    return hf, Backbone.from_pretrained(path)


@pytest.fixture
def model(qwen):
    """The module's qwen2 Backbone, with every adapter unloaded after each test."""
    m = qwen[1]
    yield m
    for n in list(m.adapters):
        m.unload_adapter(n)
    assert m.num_lora_slots == 0 and all(not layer.stacks for layer in m.resident_adapters.layers)


# ----------------------------------------------------------------------------- parity


def test_adapter_matches_peft_all_architectures(arch_case):
    arch, hf, model, tmpf = arch_case
    d = tmpf.mktemp(f"ad-{arch}")
    pm = peft_adapter(hf, d, seed=5, r=8, lora_alpha=16)
    model.load_adapter(d, "a")
    try:
        ids, cu = packed(LENS)
        names = ["a", None, "a", "a"]
        out = model(ids, cu, adapters=names)
        ref = _peft_logits(pm, ids, cu, ["default" if n else None for n in names])
        base = model(ids, cu)
        diff = _maxdiff(out, ref)
        print(f"{arch}: max|dlogits| vs peft = {diff:.2e}")
        assert diff <= TOL
        assert _maxdiff(out[:5], base[:5]) > 1e-2  # the adapter really changes the output
        assert torch.equal(out[5:6], base[5:6])  # base rows are bit-identical
    finally:
        model.unload_adapter("a")


VARIANTS = {
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "rank-alpha-patterns": dict(
        r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 40},
    ),
    "qv-only": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "layers_to_transform": dict(r=6, lora_alpha=12, layers_to_transform=[1], layers_pattern="layers"),
    "layers_to_transform-int": dict(r=6, lora_alpha=7, layers_to_transform=0),
    "regex-target": dict(r=4, lora_alpha=4, target_modules=r".*\.1\.self_attn\.(k|o)_proj"),
    "all-linear": dict(r=2, lora_alpha=5, target_modules="all-linear"),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"],
                    exclude_modules=["model.layers.0.mlp.gate_proj"]),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_peft(qwen, model, tmp_path, variant):
    hf = qwen[0]
    pm = peft_adapter(hf, tmp_path, seed=7, **VARIANTS[variant])
    model.load_adapter(tmp_path, variant)
    ids, cu = packed(LENS)
    names = [variant, None, variant, variant]
    ref = _peft_logits(pm, ids, cu, ["default" if n else None for n in names])
    diff = _maxdiff(model(ids, cu, adapters=names), ref)
    print(f"{variant}: max|dlogits| vs peft = {diff:.2e}")
    assert diff <= TOL
    if variant == "rank-alpha-patterns":
        assert model.resident_adapters.layers[0].stacks["q_proj"].lora_a.shape[1] == 4
        assert model.resident_adapters.layers[1].stacks["down_proj"].lora_a.shape[1] == 2
    if variant == "qv-only":
        assert set(model.resident_adapters.layers[0].stacks) == {"q_proj", "v_proj"}


def test_default_adapter_name_in_keys(qwen, model, tmp_path):
    """Older PEFT versions save `...q_proj.lora_A.default.weight`: read both spellings."""
    pm = peft_adapter(qwen[0], tmp_path / "plain", seed=3, r=4, lora_alpha=8)
    sd = safetensors_torch.load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    named = {k.replace(".weight", "").replace("lora_A", "lora_A.default").replace("lora_B", "lora_B.default")
             + ".weight": v for k, v in sd.items()}  # fmt: skip
    os.makedirs(tmp_path / "named")
    shutil.copy(tmp_path / "plain" / "adapter_config.json", tmp_path / "named")
    safetensors_torch.save_file(named, str(tmp_path / "named" / "adapter_model.safetensors"))
    model.load_adapter(tmp_path / "plain", "plain")
    model.load_adapter(tmp_path / "named", "named")
    ids, cu = packed(LENS)
    a = model(ids, cu, adapters=["plain"] * 4)
    assert torch.equal(a, model(ids, cu, adapters=["named"] * 4))
    assert _maxdiff(a, _peft_logits(pm, ids, cu, ["default"] * 4)) <= TOL


def test_mixed_batch_matches_peft_adapter_names(qwen, model, tmp_path):
    """[base, a1, a2, a1] in one packed batch vs peft's mixed-batch forward (adapter_names=)."""
    hf = qwen[0]
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
                             adapter_name="a1")  # fmt: skip
    pm.add_adapter("a2", peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]))
    pm.eval()
    randomize_lora(pm, seed=11)
    pm.save_pretrained(tmp_path)
    d1 = tmp_path if os.path.isfile(tmp_path / "adapter_config.json") else tmp_path / "a1"
    model.load_adapter(d1, "a1")
    model.load_adapter(tmp_path / "a2", "a2")
    names = [None, "a1", "a2", "a1"]
    # equal lengths: peft's batched mixed-adapter forward
    ids, cu = packed([9, 9, 9, 9], seed=4)
    with torch.no_grad():
        ref = pm(input_ids=ids.view(4, 9), adapter_names=["__base__", "a1", "a2", "a1"]).logits.reshape(36, -1)
    diff = _maxdiff(model(ids, cu, adapters=names), ref)
    # variable lengths: peft per sequence
    ids, cu = packed(LENS)
    diff2 = _maxdiff(model(ids, cu, adapters=names), _peft_logits(pm, ids, cu, names))
    print(f"mixed batch: max|dlogits| vs peft adapter_names = {diff:.2e}, varlen per sequence = {diff2:.2e}")
    assert diff <= TOL and diff2 <= TOL


# ----------------------------------------------------------------------------- save


SAVE_CASES = {
    "uniform": dict(r=8, lora_alpha=16),
    "patterns": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 2, "model.layers.0.mlp.up_proj": 5},
                     alpha_pattern={"model.layers.1.self_attn.o_proj": 3.5}),
    "subset": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "irregular": dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                      exclude_modules=["model.layers.1.self_attn.q_proj"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_save_round_trip_through_peft(qwen, model, tmp_path, case):
    """peft -> ours -> save_adapter -> peft.PeftModel.from_pretrained and -> ours again."""
    hf = qwen[0]
    orig = peft_adapter(hf, tmp_path / "src", seed=13, **SAVE_CASES[case])
    model.load_adapter(tmp_path / "src", "x")
    # another adapter of higher rank pads the stacks: save must slice the padding off
    peft_adapter(hf, tmp_path / "big", seed=14, r=12, lora_alpha=12)
    model.load_adapter(tmp_path / "big", "big")
    model.save_adapter("x", tmp_path / "out")
    src = safetensors_torch.load_file(str(tmp_path / "src" / "adapter_model.safetensors"))
    out = safetensors_torch.load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(src) == sorted(out)
    assert all(torch.equal(src[k], out[k]) for k in src)  # true ranks, same values
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "out")).eval()
    ids, cu = packed(LENS)
    ours = model(ids, cu, adapters=["x"] * 4)
    diff = _maxdiff(ours, _peft_logits(pm, ids, cu, ["default"] * 4))
    print(f"save {case}: max|dlogits| ours vs peft(from our save) = {diff:.2e}")
    assert diff <= TOL
    assert _maxdiff(ours, _peft_logits(orig, ids, cu, ["default"] * 4)) <= TOL
    model.load_adapter(tmp_path / "out", "x2")
    assert torch.equal(model(ids, cu, adapters=["x2"] * 4), ours)
    src_cfg = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert out_cfg["use_rslora"] == src_cfg["use_rslora"]


# ----------------------------------------------------------------------------- hot-load / unload


def test_hot_load_and_unload_keep_other_adapters(qwen, model, tmp_path, monkeypatch):
    from bsharedrag_fast.model import backbone

    trims = []  # each load / unload rebuilds the stacks: the old ones' heap pages go back
    monkeypatch.setattr(backbone, "release_free_heap", lambda: trims.append(1))
    hf = qwen[0]
    peft_adapter(hf, tmp_path / "a", seed=21, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    pb = peft_adapter(hf, tmp_path / "b", seed=22, r=16, lora_alpha=8)  # higher rank: re-pads
    peft_adapter(hf, tmp_path / "c", seed=23, r=2, lora_alpha=2, target_modules=["v_proj"])
    ids, cu = packed(LENS)
    base = model(ids, cu)
    model.load_adapter(tmp_path / "a", "a")
    out_a = model(ids, cu, adapters=["a"] * 4)
    nb_a = model.adapter_nbytes("a")
    model.load_adapter(tmp_path / "b", "b")
    assert model.adapters == ["a", "b"] and model.adapter_slots == {"a": 0, "b": 1}
    assert model.resident_adapters.layers[0].stacks["q_proj"].lora_a.shape == (2, 16, 64)
    assert _maxdiff(model(ids, cu, adapters=["a"] * 4), out_a) <= 1e-6  # zero padding only
    out_b = model(ids, cu, adapters=["b"] * 4)
    assert _maxdiff(out_b, _peft_logits(pb, ids, cu, ["default"] * 4)) <= TOL
    model.load_adapter(tmp_path / "c", "c")
    mixed = model(ids, cu, adapters=["a", None, "b", "c"])
    # bytes: true-rank payload vs padded slot share, which sum to the stacks' total
    assert model.adapter_nbytes("a") == nb_a == 2 * 4 * ((64 + 64) + (64 + 96)) * 4
    assert sum(model.adapter_nbytes(n, padded=True) for n in model.adapters) == lora_nbytes(model)
    model.unload_adapter("a")
    assert model.adapters == ["b", "c"] and model.adapter_slots == {"b": 0, "c": 1}  # compacted
    assert "up_proj" in model.resident_adapters.layers[0].stacks  # b still has it
    again = model(ids, cu, adapters=[None, None, "b", "c"])
    assert _maxdiff(again[5:], mixed[5:]) <= 1e-6 and torch.equal(again[:5], base[:5])
    with pytest.raises(ValueError, match="unknown adapter 'a'"):
        model(ids, cu, adapters=["a", None, None, None])
    model.unload_adapter("b")
    assert model.resident_adapters.layers[0].stacks["v_proj"].lora_a.shape == (1, 2, 64)  # r_max shrank to c's
    assert set(model.resident_adapters.layers[0].stacks) == {"v_proj"}
    model.unload_adapter("c")
    assert model.adapters == [] and model.num_lora_slots == 0
    assert torch.equal(model(ids, cu), base)
    assert len(trims) == 6  # 3 loads, 3 unloads


def test_prepare_then_commit_is_load_even_when_the_residents_changed(qwen, model, tmp_path):
    """The server's two-phase load: prepare_adapter (slow, beside forwards) changes nothing;
    commit_adapter swaps it in, rebuilding the stacks if other adapters came or went meanwhile."""
    hf = qwen[0]
    for name, seed, r in (("a", 31, 4), ("b", 32, 8), ("c", 33, 2)):
        peft_adapter(hf, tmp_path / name, seed=seed, r=r, lora_alpha=8)
    ids, cu = packed(LENS)
    model.load_adapter(tmp_path / "a", "a")
    stacks_before = model.resident_adapters.layers[0].stacks["q_proj"].lora_a
    prepared = adapters.prepare_adapter(model, tmp_path / "b", "b")
    assert model.adapters == ["a"] and model.resident_adapters.layers[0].stacks["q_proj"].lora_a is stacks_before
    adapters.commit_adapter(model, prepared)  # residents unchanged: the prepared stacks go in as they are
    assert model.resident_adapters.layers[0].stacks["q_proj"].lora_a is prepared.stacks[0]["q_proj"].lora_a
    want = model(ids, cu, adapters=["a", "b", None, "b"])

    hf.save_pretrained(tmp_path / "base")
    ref = Backbone.from_pretrained(tmp_path / "base")  # the same adapters loaded one after the other
    ref.load_adapter(tmp_path / "a", "a")
    ref.load_adapter(tmp_path / "b", "b")
    assert torch.equal(ref(ids, cu, adapters=["a", "b", None, "b"]), want)

    stale = adapters.prepare_adapter(model, tmp_path / "c", "c")
    model.unload_adapter("a")  # a resident left after the prepare: its stacks are stale
    adapters.commit_adapter(model, stale)
    assert model.adapters == ["b", "c"]
    ref.unload_adapter("a")
    ref.load_adapter(tmp_path / "c", "c")
    assert torch.equal(model(ids, cu, adapters=["b", "c", "c", None]), ref(ids, cu, adapters=["b", "c", "c", None]))
    with pytest.raises(ValueError, match="already loaded"):
        adapters.commit_adapter(model, stale)


# ----------------------------------------------------------------------------- errors


def _write(d, cfg=None, tensors=None, src=None):
    os.makedirs(d, exist_ok=True)
    if cfg is not None:
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        safetensors_torch.save_file(tensors, str(d / "adapter_model.safetensors"))


def _bad_cases(good):
    cfg = json.loads((good / "adapter_config.json").read_text())
    sd = safetensors_torch.load_file(str(good / "adapter_model.safetensors"))
    k0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert k0 in sd

    def with_cfg(**kw):
        return dict(cfg, **kw), sd

    def with_sd(edit):
        s = dict(sd)
        edit(s)
        return cfg, s

    return {
        "missing dir": (None, None, "does not exist"),
        "missing config": (None, sd, "no adapter_config.json"),
        "missing weights": (cfg, None, "no adapter_model.safetensors"),
        "bad json": ("{not json", sd, "cannot read adapter config"),
        "wrong shape": (*with_sd(lambda s: s.__setitem__(k0, torch.zeros(3, 64))), "expected"),
        "missing module": (*with_sd(lambda s: s.pop(k0)), "missing lora_A"),
        "unknown target": (*with_cfg(target_modules=["c_attn"]), "match no module"),
        "lm_head target": (*with_cfg(target_modules=["q_proj", "lm_head"]), "lm_head"),
        "embedding lora": (*with_sd(lambda s: s.__setitem__(
            "base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(8, 128))), "unexpected tensors"),
        "lora on unknown module": (*with_sd(lambda s: s.__setitem__(
            "base_model.model.lm_head.lora_A.weight", torch.zeros(8, 64))), "unsupported module 'lm_head'"),
        "extra layer": (*with_sd(lambda s: s.__setitem__(
            "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", torch.zeros(8, 64))), "layers.5"),
        "use_dora": (*with_cfg(use_dora=True), "use_dora"),
        "bias": (*with_cfg(bias="all"), "bias"),
        "lora_bias": (*with_cfg(lora_bias=True), "lora_bias"),
        "modules_to_save": (*with_cfg(modules_to_save=["lm_head"]), "modules_to_save"),
        "fan_in_fan_out": (*with_cfg(fan_in_fan_out=True), "fan_in_fan_out"),
        "layer_replication": (*with_cfg(layer_replication=[[0, 2]]), "layer_replication"),
        "peft_type": (*with_cfg(peft_type="IA3"), "peft_type"),
        "zero rank": (*with_cfg(r=0), "rank"),
        "pickle only": ("bin", None, "pickle"),
        "duplicate name": ("dup", None, "already loaded"),
    }


def test_bad_inputs_leave_model_unchanged(qwen, model, tmp_path):
    hf = qwen[0]
    peft_adapter(hf, tmp_path / "good", seed=31, r=8, lora_alpha=16)
    peft_adapter(hf, tmp_path / "second", seed=32, r=4, lora_alpha=4, target_modules=["o_proj"])
    model.load_adapter(tmp_path / "good", "first")
    model.load_adapter(tmp_path / "second", "second")
    ids, cu = packed(LENS)
    names = ["first", None, "second", "first"]
    before = model(ids, cu, adapters=names)
    stacks_before = [{n: (s.lora_a, s.lora_b, s.scaling) for n, s in layer.stacks.items()} for layer in model.resident_adapters.layers]
    for i, (case, (cfg, sd, msg)) in enumerate(sorted(_bad_cases(tmp_path / "good").items())):
        d = tmp_path / f"bad{i}"
        name = "new"
        if case == "missing dir":
            pass
        elif case == "duplicate name":
            d, name = tmp_path / "good", "first"
        elif case == "pickle only":
            _write(d, json.loads((tmp_path / "good" / "adapter_config.json").read_text()))
            (d / "adapter_model.bin").write_bytes(b"x")
        elif isinstance(cfg, str):
            _write(d, tensors=sd)
            (d / "adapter_config.json").write_text(cfg)
        else:
            _write(d, cfg, sd)
        with pytest.raises(ValueError, match=msg):
            model.load_adapter(d, name)
        assert model.adapters == ["first", "second"], case
        for layer, st in zip(model.resident_adapters.layers, stacks_before):
            assert {n: (s.lora_a, s.lora_b, s.scaling) for n, s in layer.stacks.items()} == st, case
        assert torch.equal(model(ids, cu, adapters=names), before), case
    for bad in ("nope", None):
        with pytest.raises(ValueError, match="unknown adapter"):
            model.unload_adapter(bad)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_adapter("nope", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model(ids, cu, adapters=["first", None, "nope", None])
    with pytest.raises(ValueError, match="non-empty string"):
        model.load_adapter(tmp_path / "good", "")
    assert model.adapters == ["first", "second"]
    assert torch.equal(model(ids, cu, adapters=names), before)


def test_hand_set_stacks_refuse_named_loading(qwen, model, tmp_path):
    peft_adapter(qwen[0], tmp_path, seed=41, r=2, lora_alpha=2, target_modules=["q_proj"])
    model.load_adapter(tmp_path, "a")
    stacks = [dict(layer.stacks) for layer in model.resident_adapters.layers]
    model.set_lora_stacks(stacks, 1)  # without names: the stacks are the caller's, by slot
    assert model.adapters == []
    with pytest.raises(ValueError, match="set_lora_stacks directly"):
        model.load_adapter(tmp_path, "b")
    model.set_lora_stacks([{} for _ in model.layers], 0)


def test_bf16_model_loads_and_saves(qwen, tmp_path):
    hf = qwen[0]
    hf.save_pretrained(tmp_path / "base")
    m = Backbone.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    peft_adapter(hf, tmp_path / "a", seed=51, r=4, lora_alpha=8)
    m.load_adapter(tmp_path / "a", "a")
    assert m.resident_adapters.layers[0].stacks["q_proj"].lora_a.dtype == torch.bfloat16
    m.save_adapter("a", tmp_path / "out")
    out = safetensors_torch.load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert m.adapter_nbytes("a") == sum(t.numel() * 2 for t in out.values())


def test_memory_report_counts_backbone_adapters_and_cache(qwen, model, tmp_path):
    from bsharedrag_fast import KVCache
    from bsharedrag_fast.model.adapters import lora_nbytes

    hf = qwen[0]
    base = model.memory_report()
    # one fp32 copy of every parameter (tied embeddings once) + the rope table
    assert base["backbone"] == hf.num_parameters() * 4 + model.inv_freq.numel() * 4
    assert base["adapters"] == {} and base["lora_stacks"] == 0 and base["total"] == base["backbone"]
    peft_adapter(hf, tmp_path / "a", 1, r=4, lora_alpha=8)
    peft_adapter(hf, tmp_path / "b", 2, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.load_adapter(tmp_path / "a", "a")
    model.load_adapter(tmp_path / "b", "b")
    cache = KVCache(model.config, 1 << 20)
    rep = model.memory_report(cache)
    assert set(rep["adapters"]) == {"a", "b"} and sum(rep["adapters"].values()) == rep["lora_stacks"]
    assert rep["lora_stacks"] == lora_nbytes(model) > 0 and rep["cache"] == cache.nbytes > 0
    assert rep["total"] == rep["backbone"] + rep["lora_stacks"] + rep["cache"]
    assert rep["backbone"] == base["backbone"]
