"""Tiny models and data sets for the training tests (random weights, nothing downloaded)."""
import json

import pytest
import torch
from tiny_models import write_tokenizer

from bsharedrag_fast.train import init_checkpoint

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            initializer_range=0.25)  # larger than HF's 0.02: a LoRA moves the logits within a few steps
WORDS = ["quick", "brown", "fox", "lazy", "dog", "shared", "backbone", "retrieval", "generation", "low",
         "rank", "adapters", "resident", "model", "jumps", "over"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread avoids OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_dir(path, arch: str = "LlamaForCausalLM", **overrides):
    """A random tiny model with the test tokenizer in path; returns str(path)."""
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path)
    init_checkpoint(str(path), dict(TINY, architectures=[arch], **overrides), seed=0)
    return str(path)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def doc_text(i: int) -> str:
    """Document i: two words that name it, repeated in a sentence."""
    a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
    return f"the {a} {b} is {a} and {b}"


def beir_dir(path, n: int = 12) -> str:
    """BEIR layout: n documents, n queries (query i names the words of document i), qrels/train.tsv."""
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "corpus.jsonl", [{"_id": f"d{i}", "title": WORDS[i % len(WORDS)], "text": doc_text(i)}
                                        for i in range(n)])
    write_jsonl(path / "queries.jsonl", [{"_id": f"q{i}", "text": " ".join(doc_text(i).split()[1:3])}
                                         for i in range(n)])
    (path / "qrels").mkdir(exist_ok=True)
    (path / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)))
    return str(path)


def qa_rows(n: int = 8) -> list:
    """QA records whose answer is the second word of the question's first context."""
    return [{"question": f"which {WORDS[i]} word", "answer": WORDS[(i * 5 + 1) % len(WORDS)],
             "contexts": [{"title": WORDS[i], "text": doc_text(i)}, doc_text(i + 1)]} for i in range(n)]
