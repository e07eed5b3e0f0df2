"""RAGPipeline and the `bsharedrag` CLI end to end on a tiny random model with PEFT adapters."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("hnswlib")

from bsharedrag_fast import Backbone, Tokenizer  # noqa: E402
from bsharedrag_fast.cli.main import main  # noqa: E402
from bsharedrag_fast.index.hnsw import HNSWIndex  # noqa: E402
from bsharedrag_fast.rag.pipeline import TEMPLATES, RAGPipeline, build_prompt, contexts  # noqa: E402
from bsharedrag_fast.engine.runtime import SharedRuntime  # noqa: E402
from tiny_models import rag_checkpoint  # noqa: E402

DOCS = [
    {"_id": f"d{i}", "title": f"item {i}", "text": t}
    for i, t in enumerate([
        "the quick brown fox jumps over the lazy dog", "shared backbone, retrieval and generation",
        "low rank adapters share one resident model", "the lazy dog sleeps", "a brown fox runs",
        "retrieval adapters embed passages", "generation adapters answer questions", "one model, two adapters",
    ])
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    rag_checkpoint(root)
    with open(root / "corpus.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps(d) + "\n")
    return root


def _args(root):
    return ["--model", str(root / "model"), "--retrieval-adapter", str(root / "retrieval")]


def test_index_is_resumable_and_ask_answers(setup, capsys):
    root = setup
    out = root / "index"
    assert main(["index", *_args(root), "--corpus", str(root / "corpus.jsonl"), "--out", str(out),
                 "--batch-size", "3", "--save-every", "3"]) == 0  # fmt: skip
    assert f"indexed {len(DOCS)} documents ({len(DOCS)} new)" in capsys.readouterr().out
    assert main(["index", *_args(root), "--corpus", str(root / "corpus.jsonl"), "--out", str(out)]) == 0
    assert f"({0} new)" in capsys.readouterr().out
    assert len(HNSWIndex.load(str(out))) == len(DOCS)

    assert main(["ask", *_args(root), "--generation-adapter", str(root / "generation"), "--index", str(out),
                 "--max-new-tokens", "5", "what does the fox do?", "which model?"]) == 0  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(len(x["sources"]) == 3 for x in lines)
    assert {d for x in lines for d, _ in x["sources"]} <= {d["_id"] for d in DOCS}

    # another embedder (no retrieval adapter) must not query this index
    assert main(["ask", "--model", str(root / "model"), "--index", str(out), "q"]) == 2
    assert "embedder" in capsys.readouterr().err


def _last_err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_index_is_checked_by_content_on_every_load(setup, capsys, tmp_path):
    """A different adapter under the same path, another max length, or a same-size corrupted
    index file is refused with a one-line error naming what differs; flags opt out."""
    import shutil

    root = setup
    out = tmp_path / "index"
    assert main(["index", *_args(root), "--corpus", str(root / "corpus.jsonl"), "--out", str(out)]) == 0
    ask = ["ask", "--model", str(root / "model"), "--retrieval-adapter", str(tmp_path / "ret"),
           "--generation-adapter", str(root / "generation"), "--index", str(out), "--max-new-tokens", "2", "fox?"]
    shutil.copytree(root / "retrieval", tmp_path / "ret")  # a copy: same content, another path
    assert main(ask) == 0
    capsys.readouterr()
    assert main([*ask, "--max-length", "64"]) == 2
    assert "max_length: index has 512, given 64" in _last_err(capsys)

    shutil.rmtree(tmp_path / "ret")
    shutil.copytree(root / "generation", tmp_path / "ret")  # another adapter under the same name
    assert main(ask) == 2
    err = _last_err(capsys)
    assert err.startswith("bsharedrag ask: error: embedder mismatch") and "adapter_sha256: index has" in err
    assert main([*ask, "--allow-mismatch"]) == 0
    capsys.readouterr()

    shutil.rmtree(tmp_path / "ret")
    shutil.copytree(root / "retrieval", tmp_path / "ret")
    bin_path = out / "index.bin"
    data = bytearray(bin_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    bin_path.write_bytes(bytes(data))
    assert main(ask) == 2
    assert "does not match its sha256" in _last_err(capsys)
    assert main(["index", *_args(root), "--corpus", str(root / "corpus.jsonl"), "--out", str(out)]) == 2
    assert "does not match its sha256" in _last_err(capsys)


def test_index_refuses_repeated_ids_and_bad_batches(setup, capsys, tmp_path):
    root = setup
    corpus = tmp_path / "corpus.jsonl"
    rows = [*DOCS, {"_id": "d9", "text": "first"}, {"_id": "d1", "text": "the same id again"}]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in rows))
    out = tmp_path / "index"
    assert main(["index", *_args(root), "--corpus", str(corpus), "--out", str(out), "--batch-size", "4"]) == 2
    assert f"{corpus}:10: document id 'd1' is already on line 2" in _last_err(capsys)
    assert not out.exists()
    assert main(["index", *_args(root), "--corpus", str(corpus), "--out", str(out), "--upsert"]) == 0
    idx = HNSWIndex.load(str(out))
    assert len(idx) == len(DOCS) + 1 and idx.get("d1")["text"] == "the same id again"
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            main(["index", *_args(root), "--corpus", str(corpus), "--out", str(out), "--batch-size", bad])
        assert "--batch-size: expected an int >= 1" in capsys.readouterr().err
    for args, what in ((["--device", "bogus"], "not a device"), (["--temperature", "nan"], "finite number"),
                       (["--max-new-tokens", "5", "--top-p", "inf"], "finite number")):
        with pytest.raises(SystemExit):
            main(["generate", "--model", str(root / "model"), *args, "x"])
        assert what in capsys.readouterr().err


def test_broken_files_are_one_line_errors(setup, capsys, tmp_path):
    """Every file a user hands us fails with one line naming it, without a traceback (--debug
    shows one)."""
    import shutil

    root = setup

    def model_with(name, edit):
        d = tmp_path / name
        shutil.copytree(root / "model", d)
        edit(d)
        return str(d)

    def config_edit(**kw):
        return lambda d: (d / "config.json").write_text(json.dumps(dict(json.loads((d / "config.json").read_text()),
                                                                         **kw)))

    cases = [
        (model_with("garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 64)),
         "model.safetensors: not a readable safetensors file"),
        (model_with("tok", lambda d: (d / "tokenizer.json").write_text("{ nope")), "tokenizer.json: not a readable"),
        (model_with("tokcfg", lambda d: (d / "tokenizer_config.json").write_text("[1, ")),
         "tokenizer_config.json: not valid JSON"),
        (model_with("heads", config_edit(num_attention_heads=0)), "num_attention_heads must be an int >= 1, got 0"),
        (model_with("kv", config_edit(num_key_value_heads=3)), "must be a multiple of num_key_value_heads"),
        (model_with("cfg", lambda d: (d / "config.json").write_text("{")), "config.json: not valid JSON"),
    ]
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    cases.append((str(gguf), "broken.gguf"))
    for model, what in cases:
        assert main(["embed", "--model", model, "--text", "x"]) == 2, what
        err = capsys.readouterr().err
        assert "Traceback" not in err and what in err.strip().splitlines()[-1], (what, err)
        assert err.strip().splitlines()[-1].startswith("bsharedrag embed: error: ")
    with pytest.raises(ValueError, match="num_attention_heads"):
        main(["embed", "--model", cases[3][0], "--text", "x", "--debug"])

    index = tmp_path / "index"
    assert main(["index", *_args(root), "--corpus", str(root / "corpus.jsonl"), "--out", str(index)]) == 0
    manifest = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps(dict(manifest, ef="many")))
    capsys.readouterr()
    assert main(["ask", *_args(root), "--index", str(index), "fox?"]) == 2
    assert "manifest.json: ef must be an int >= 1, got 'many'" in capsys.readouterr().err
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps(DOCS[0]) + "\n{oops\n")
    assert main(["index", *_args(root), "--corpus", str(corpus), "--out", str(tmp_path / "i2")]) == 2
    assert f"{corpus}:2: not valid JSON" in capsys.readouterr().err


def test_embed_and_generate_commands(setup, capsys, tmp_path):
    root = setup
    assert main(["embed", *_args(root)[:2], "--adapter", str(root / "retrieval"), "--text", "a brown fox",
                 "--out", str(tmp_path / "v.npy")]) == 0  # fmt: skip
    import numpy as np

    v = np.load(tmp_path / "v.npy")
    assert v.shape == (1, 64) and abs(float(np.linalg.norm(v)) - 1) < 1e-5
    assert main(["generate", "--model", str(root / "model"), "--adapter", str(root / "generation"),
                 "--max-new-tokens", "4", "the quick"]) == 0  # fmt: skip
    rec = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rec["finish_reason"] in ("length", "eos") and isinstance(rec["text"], str)


def test_cli_errors_are_clear(setup, capsys, tmp_path):
    root = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "x", "title": "", "text": "  "}\n')
    assert main(["index", *_args(root), "--corpus", str(bad), "--out", str(tmp_path / "i")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["ask", *_args(root), "--index", str(tmp_path / "missing"), "q"]) == 2
    assert main(["embed", *_args(root)[:2]]) == 2
    assert "nothing to embed" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "bsharedrag_fast.cli", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for cmd in ("index", "embed", "ask", "generate"):
        assert cmd in help_text


def test_rag_pipeline_plumbing(setup):
    root = setup
    model = Backbone.from_pretrained(root / "model")
    model.load_adapter(root / "retrieval", "retrieval")
    model.load_adapter(root / "generation", "generation")
    rt = SharedRuntime(model, Tokenizer.from_pretrained(root / "model"))
    idx = HNSWIndex(model.config.hidden_size)
    idx.upsert([d["_id"] for d in DOCS], rt.embed([d["text"] for d in DOCS], adapter="retrieval",
                                                   prefix="passage: "), DOCS)  # fmt: skip
    rag = RAGPipeline(rt, idx, k=3, context_tokens=12, max_new_tokens=4)
    questions = ["what does the fox do?", "which model?"]
    answers = rag.ask_many(questions)
    q_vecs = rt.embed(questions, adapter="retrieval", prefix="query: ")
    for q, ans, hits in zip(questions, answers, idx.search(q_vecs, 3)):
        assert ans.sources == hits  # retrieval = the engine's query embedding + index search
        docs = [idx.get(d) for d, _ in hits]
        ctx = contexts(rt.tokenizer, docs, 12)
        assert ans.prompt == TEMPLATES["en"].format(context=ctx, question=q)  # budget 12 < room
        assert ans.prompt == build_prompt(rt.tokenizer, q, docs, "en", chat=False, context_tokens=12,
                                          max_length=rt.max_length, max_new_tokens=4)
        bodies = [line.split("] ", 1)[1] for line in ctx.split("\n")]
        assert [line[:4] for line in ctx.split("\n")] == ["[1] ", "[2] ", "[3] "]
        # the budget in all (re-encoding a cut piece may merge differently: one token of slack per doc)
        assert sum(len(rt.tokenizer.encode(b, add_special_tokens=False)) for b in bodies) <= 12 + len(docs)
        direct = rt.generate([ans.prompt], adapter="generation", max_new_tokens=4)[0]
        assert ans.text == direct.text.strip()
    assert rag.ask(questions[0]).sources == answers[0].sources
    with pytest.raises(ValueError, match="question 0 is empty"):
        rag.ask(" ")
    with pytest.raises(ValueError, match="missing \\{question\\}"):
        RAGPipeline(rt, idx, template="{context} only")
    zh = RAGPipeline(rt, idx, template="zh", max_new_tokens=2).ask(questions[0])
    assert zh.prompt.startswith("请根据以下参考资料回答问题")

    # Separate RAG: questions embedded by another engine (an embedder model), answers by this one
    embedder = Backbone.from_pretrained(root / "model")
    embedder.load_adapter(root / "retrieval", "retrieval")
    rt_e = SharedRuntime(embedder, Tokenizer.from_pretrained(root / "model"))
    sep = RAGPipeline(rt, idx, k=3, context_tokens=12, max_new_tokens=4, retrieval_runtime=rt_e)
    rt_rows = rt.stats["embed_rows"]
    assert [a.sources for a in sep.ask_many(questions)] == [a.sources for a in answers]
    assert rt.stats["embed_rows"] == rt_rows and rt_e.stats["embed_rows"] > 0  # the embedder did the embedding
