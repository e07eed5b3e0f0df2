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
from bsharedrag_fast.cli import main  # noqa: E402
from bsharedrag_fast.index import HNSWIndex  # noqa: E402
from bsharedrag_fast.rag import TEMPLATES, RAGPipeline  # noqa: E402
from bsharedrag_fast.runtime import SharedRuntime  # noqa: E402
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
        ids = [d for d, _ in hits]
        assert ans.prompt == TEMPLATES["en"].format(context=rag.contexts(ids), question=q)  # budget 12 < room
        bodies = [line.split("] ", 1)[1] for line in rag.contexts(ids).split("\n")]
        assert [line[:4] for line in rag.contexts(ids).split("\n")] == ["[1] ", "[2] ", "[3] "]
        # the budget in all (re-encoding a cut piece may merge differently: one token of slack per doc)
        assert sum(len(rt.tokenizer.encode(b, add_special_tokens=False)) for b in bodies) <= 12 + len(ids)
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
