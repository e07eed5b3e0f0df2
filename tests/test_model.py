"""Backbone / Tokenizer parity against transformers on tiny random models built here.

Nothing is downloaded: every model and tokenizer is built and saved in tmp_path.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bsharedrag_fast import Backbone, ModelConfig, Tokenizer, ops  # noqa: E402
from bsharedrag_fast.model.adapters import LoRAStack  # noqa: E402
from bsharedrag_fast.model.backbone import load_state_dict, rope_inv_freq  # noqa: E402
from bsharedrag_fast.ops import rms_norm_reference  # noqa: E402
from tiny_models import SMALL, hf_model, packed, spans  # noqa: E402

TOL = 1e-4
LENS = [5, 1, 20]  # packed batch: includes a length-1 sequence
LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # fmt: skip


CASES = {
    # Llama with llama3 RoPE scaling, untied head, sharded save (index file)
    "llama3-sharded": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0), "24KB"),
    # Qwen2: q/k/v bias, tied embeddings, single file
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_hidden_layers=3), None),
    # Mistral with a sliding window shorter than the longest sequence
    "mistral-window": ("mistral", dict(sliding_window=8, head_dim=16), None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, overrides, shard = CASES[request.param]
    hf = hf_model(arch, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    if shard:
        hf.save_pretrained(path, max_shard_size=shard)
        assert os.path.isfile(path / "model.safetensors.index.json")
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    else:
        hf.save_pretrained(path)
        assert os.path.isfile(path / "model.safetensors")
    return request.param, hf, path, Backbone.from_pretrained(path)


@torch.no_grad()
def _hf_per_sequence(hf, ids, cu):
    logits, hidden = [], []
    for s, e in spans(cu):
        out = hf(ids[s:e][None], output_hidden_states=True)
        logits.append(out.logits[0])
        hidden.append(hf.model(ids[s:e][None]).last_hidden_state[0])
    return torch.cat(logits), torch.cat(hidden)


def test_logits_and_hidden_match_transformers(case):
    name, hf, _, model = case
    ids, cu = packed(LENS)
    ref_logits, ref_hidden = _hf_per_sequence(hf, ids, cu)
    logits = model(ids, cu)
    hidden = model.hidden_states(ids, cu)
    assert logits.shape == (sum(LENS), 128) and hidden.shape == (sum(LENS), 64)
    d_logits = (logits - ref_logits).abs().max().item()
    d_hidden = (hidden - ref_hidden).abs().max().item()
    print(f"{name}: max|dlogits|={d_logits:.2e} max|dhidden|={d_hidden:.2e}")
    assert d_logits <= TOL and d_hidden <= TOL


def test_config_and_layout(case):
    name, hf, _, model = case
    cfg = model.config
    assert cfg.architecture == hf.config.architectures[0]
    assert cfg.tie_word_embeddings == (name == "qwen2-tied")
    if name == "qwen2-tied":
        assert model.lm_head is model.embed and model.layers[0].qkv_bias is not None
    if name == "mistral-window":
        assert cfg.sliding_window == 8
    # inv_freq exactly as transformers computes it (default and llama3)
    assert torch.equal(rope_inv_freq(cfg), hf.model.rotary_emb.inv_freq.float())
    layer = model.layers[0]
    assert layer.qkv_weight.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    assert layer.gate_up_weight.shape == (2 * cfg.intermediate_size, cfg.hidden_size)


def test_logits_rows_subset(case):
    _, _, _, model = case
    ids, cu = packed(LENS)
    full = model(ids, cu)
    rows = torch.tensor([4, 5, 25])  # the last row of each sequence
    # the same rows through a smaller GEMM: equal up to BLAS blocking order
    assert (model(ids, cu, logits_rows=rows) - full[rows]).abs().max().item() <= 1e-5
    assert model(ids, cu, logits_rows=torch.tensor([], dtype=torch.long)).shape == (0, 128)


def test_pool_fuses_final_norm(case):
    _, _, _, model = case
    ids, cu = packed(LENS)
    pre = model.hidden_states(ids, cu, final_norm=False)
    post = model.hidden_states(ids, cu)
    fused = ops.pool(pre, cu, mode="last", norm_weight=model.norm, eps=model.config.rms_norm_eps)
    unfused = ops.pool(post, cu, mode="last")
    assert (fused - unfused).abs().max().item() <= 1e-5


def test_multi_lora_matches_merged_weights(case):
    """Sequences on adapters [0, none, 1] equal per-adapter models with W + s B A merged in."""
    _, _, path, model = case
    cfg = model.config
    L, r = 2, 4
    g = torch.Generator().manual_seed(3)
    stacks, deltas = [], [{} for _ in range(L)]
    for l in range(cfg.num_hidden_layers):
        st = {}
        for mod, (fin, fout) in model.module_shapes.items():
            if mod == "v_proj" and l == 0:
                continue  # a module without an adapter stays base only
            a = torch.randn(L, r, fin, generator=g) * 0.1
            b = torch.randn(L, fout, r, generator=g) * 0.1
            s = torch.tensor([0.5, 2.0])
            st[mod] = LoRAStack(a, b, s)
            group = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            for k in range(L):
                deltas[k][f"model.layers.{l}.{group}.{mod}.weight"] = s[k] * b[k] @ a[k]
        stacks.append(st)
    ids, cu = packed(LENS)
    base_logits = model(ids, cu)
    model.set_lora_stacks(stacks, L)
    try:
        out = model(ids, cu, adapters=[0, None, 1])
        model.adapter_slots.update({"ret": 0, "gen": 1})
        assert torch.equal(model(ids, cu, adapters=["ret", None, "gen"]), out)
        assert torch.equal(model(ids, cu), base_logits)  # no adapters: base only
    finally:
        model.set_lora_stacks([{} for _ in model.layers], 0)
        model.adapter_slots.clear()
    sd = load_state_dict(str(path), cfg, torch.float32, torch.device("cpu"))
    for b, ((s, e), slot) in enumerate(zip(spans(cu), [0, None, 1])):
        if slot is None:
            ref = base_logits[s:e]
        else:
            merged = Backbone(cfg, {k: v + deltas[slot].get(k, 0) for k, v in sd.items()})
            ref = merged(ids[s:e], torch.tensor([0, e - s], dtype=torch.int32))
        assert (out[s:e] - ref).abs().max().item() <= TOL, f"sequence {b}"


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-plain")
    hf_model("llama", num_hidden_layers=1).save_pretrained(path)
    return path


def _copy(src, dst, edit_config=None, edit_tensors=None):
    os.makedirs(dst, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = safetensors_torch.load_file(str(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(sd)
    safetensors_torch.save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(saved_llama, tmp_path):
    p = _copy(saved_llama, tmp_path / "m", edit_tensors=lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensors.*model.layers.0.mlp.up_proj.weight"):
        Backbone.from_pretrained(p)


def test_unexpected_tensor_is_named(saved_llama, tmp_path):
    p = _copy(saved_llama, tmp_path / "m", edit_tensors=lambda sd: sd.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="unexpected tensors.*model.extra.weight"):
        Backbone.from_pretrained(p)


def test_wrong_shape_is_named(saved_llama, tmp_path):
    def edit(sd):
        sd["model.norm.weight"] = torch.ones(3)

    with pytest.raises(ValueError, match="model.norm.weight"):
        Backbone.from_pretrained(_copy(saved_llama, tmp_path / "m", edit_tensors=edit))


def test_loaded_weights_leave_the_file(saved_llama, tmp_path):
    """Every tensor is copied out of the checkpoint's memory maps (none stays mapped, so no page
    read while loading stays resident): truncating the file after the load changes nothing,
    where a tensor still on a map would fault (SIGBUS, hence a subprocess)."""
    p = _copy(saved_llama, tmp_path / "m")
    code = (
        "import sys, torch\n"
        "from bsharedrag_fast import Backbone\n"
        "ids, cu = torch.arange(1, 9), torch.tensor([0, 5, 8], dtype=torch.int32)\n"
        "m = Backbone.from_pretrained(sys.argv[1])\n"
        "before = m(ids, cu)\n"
        "open(sys.argv[1] + '/model.safetensors', 'wb').close()\n"
        "assert torch.equal(m(ids, cu), before)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_weights_load_into_one_buffer_merging_without_copies(saved_llama):
    """load_state_dict places every weight in one map (util.mapped: 2 MiB-aligned, advised for
    huge pages), each layer's q, k, v and gate, up back to back: the merged projections are
    views of it (one storage for every parameter), and they hold the file's tensors."""
    model = Backbone.from_pretrained(saved_llama)
    sd = safetensors_torch.load_file(str(saved_llama / "model.safetensors"))
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert model.embed.data_ptr() % (2 << 20) == 0  # the first weight starts the buffer
    p, layer = "model.layers.0.", model.layers[0]
    assert torch.equal(layer.qkv_weight, torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
    assert torch.equal(layer.gate_up_weight, torch.cat([sd[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]))
    out = model.hf_state_dict()
    assert sorted(out) == sorted(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_unknown_architecture(saved_llama, tmp_path):
    p = _copy(saved_llama, tmp_path / "m", edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Backbone.from_pretrained(p)


def test_unsupported_rope_scaling(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(cfg)


def test_old_style_rope_config():
    """transformers 4.x configs carry rope_theta + rope_scaling (type or rope_type)."""
    cfg = dict(SMALL, architectures=["LlamaForCausalLM"], rope_theta=500000.0,
               rope_scaling=dict(LLAMA3, type="llama3"))  # fmt: skip
    mc = ModelConfig.from_hf(cfg)
    assert mc.rope_theta == 500000.0 and mc.rope_scaling["factor"] == 8.0 and mc.head_dim == 16


def test_missing_config_json(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        Backbone.from_pretrained(tmp_path)


def test_missing_weights(saved_llama, tmp_path):
    (tmp_path / "config.json").write_text((saved_llama / "config.json").read_text())
    with pytest.raises(ValueError, match="model.safetensors"):
        Backbone.from_pretrained(tmp_path)


def test_bad_cu_seqlens(saved_llama):
    model = Backbone.from_pretrained(saved_llama)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, torch.tensor([0, 0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="adapter"):
        model(ids, torch.tensor([0, 3], dtype=torch.int32), adapters=["nope"])


def test_bf16_load(saved_llama):
    model = Backbone.from_pretrained(saved_llama, dtype=torch.bfloat16)
    assert model.embed.dtype == torch.bfloat16 and model.layers[0].qkv_weight.dtype == torch.bfloat16
    ids, cu = packed(LENS)
    out32 = Backbone.from_pretrained(saved_llama)(ids, cu)
    out16 = model(ids, cu)
    assert out16.dtype == torch.bfloat16 and (out16.float() - out32).abs().max().item() < 0.1


# ----------------------------------------------------------------------------- tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    corpus = ["the quick brown fox jumps over the lazy dog", "shared backbone, retrieval and generation",
              "low rank adapters share one resident model"] * 20  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},  # the AddedToken form
        "unk_token": "<unk>", "chat_template": TEMPLATE,
    }))  # fmt: skip
    return path


TEXTS = ["the quick brown fox", "Shared backbone: retrieval + generation!", "unseen wörds ünïcode 123", ""]


def test_tokenizer_matches_transformers(tok_dir):
    ours = Tokenizer.from_pretrained(tok_dir)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert ours.bos_token_id == hf.bos_token_id == 1 and ours.eos_token_id == hf.eos_token_id == 2
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
        ids = ours.encode(text)
        assert ids[0] == ours.bos_token_id
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
        assert ours.decode(ids + [2], skip_special_tokens=False) == hf.decode(ids + [2], skip_special_tokens=False)


def test_chat_template_matches_transformers(tok_dir):
    ours = Tokenizer.from_pretrained(tok_dir)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox?"}]
    for gen in (True, False):
        text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert text.startswith("<s><|system|>\nbe brief</s>\n")
    assert ours.apply_chat_template(msgs, tokenize=True) == ours.encode(
        ours.apply_chat_template(msgs), add_special_tokens=False
    )


def test_tokenizer_errors(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    bare = Tokenizer.from_pretrained(tmp_path)  # no tokenizer_config.json: no specials, no template
    assert bare.eos_token_id is None and bare.encode("the fox") == Tokenizer.from_pretrained(tok_dir).encode("the fox")
    with pytest.raises(ValueError, match="chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_rms_norm_is_transformers_formula_bit_for_bit():
    """The reference takes torch.rms_norm in fp32 (one dispatch): it must equal LlamaRMSNorm's ops exactly."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for T, d in ((1, 576), (7, 64), (300, 960), (5, 1)):
            x, w = (torch.randn(T, d, generator=g) * 3).to(dtype), torch.randn(d, generator=g).to(dtype)
            h = x.float()
            want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
            assert torch.equal(rms_norm_reference(x, w, 1e-6), want), (dtype, T, d)
