"""WorthBuying-mini (bsharedrag_fast.demo): determinism, BEIR readability, answers in their documents,
near-duplicates, updates; and the BPE tokenizer trainer against transformers' tokenizer."""
import filecmp
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest

from bsharedrag_fast import Tokenizer
from bsharedrag_fast.rag.data import load_beir, load_qrels, read_jsonl
from bsharedrag_fast.demo import SPECIAL_TOKEN_IDS, WorthBuyingPaths, generate_worthbuying, train_bpe_tokenizer
from bsharedrag_fast.demo.worthbuying import COMMON_BRANDS, SIZES

FILES = ("corpus", "queries", "qrels_train", "qrels_test", "qa_train", "qa_test", "domain", "general", "updates")


@pytest.fixture(scope="module")
def wb(tmp_path_factory) -> WorthBuyingPaths:
    return generate_worthbuying(tmp_path_factory.mktemp("wb"), seed=0, size="quick")


@pytest.fixture(scope="module")
def corpus(wb) -> dict:
    return {d["_id"]: d for d in read_jsonl(wb.corpus)}


@pytest.fixture(scope="module")
def tok_dir(wb, tmp_path_factory) -> str:
    return train_bpe_tokenizer([wb.domain, Path(wb.general)], tmp_path_factory.mktemp("tok"), vocab_size=1024)


def _occurs(answer: str, text: str) -> bool:
    """answer as a whole span of text ("8 units" is not in "18 units")."""
    return re.search(rf"(?<![\w$.]){re.escape(answer)}(?!\w)", text) is not None


def test_same_seed_gives_identical_files_and_another_seed_differs(wb, tmp_path):
    again = generate_worthbuying(tmp_path / "again", seed=0, size="quick")
    for name in FILES:
        assert filecmp.cmp(getattr(wb, name), getattr(again, name), shallow=False), name
    other = generate_worthbuying(tmp_path / "other", seed=1, size="quick")
    assert not filecmp.cmp(wb.corpus, other.corpus, shallow=False)


def test_beir_files_load_and_splits_are_disjoint(wb, corpus):
    train, test = load_beir(wb.root, "train"), load_beir(wb.root, "test")
    assert set(train.corpus) == set(test.corpus) == set(corpus)
    assert not set(train.queries) & set(test.queries)
    assert len(train.queries) > 4 * len(test.queries) > 0
    with open(wb.qrels_test) as f:
        assert f.readline() == "query-id\tcorpus-id\tscore\n"
    for split in (train, test):  # every judged document exists (load_beir checks too)
        assert all(d in corpus for judged in split.qrels.values() for d in judged)


def test_sizes_match_the_brief(wb, tmp_path):
    full = generate_worthbuying(tmp_path / "full", size="full")
    docs = sum(1 for _ in read_jsonl(full.corpus))
    products = {d["metadata"]["product_id"] for d in read_jsonl(full.corpus)}
    n_train, n_test = (sum(1 for _ in read_jsonl(p)) for p in (full.qa_train, full.qa_test))
    assert 300 <= len(products) <= 600 and 1500 <= docs <= 3000
    assert 900 <= n_train <= 1200 and 150 <= n_test <= 250
    quick_docs = sum(1 for _ in read_jsonl(wb.corpus))
    assert docs / 5 <= quick_docs <= docs / 3


def test_qa_records_match_queries_qrels_and_their_documents(wb, corpus):
    queries = {q["_id"]: q["text"] for q in read_jsonl(wb.queries)}
    for qa_path, qrels_path in ((wb.qa_train, wb.qrels_train), (wb.qa_test, wb.qrels_test)):
        qrels = load_qrels(qrels_path)
        records = list(read_jsonl(qa_path))
        assert {r["query_id"] for r in records} == set(qrels)
        for r in records:
            assert queries[r["query_id"]] == r["question"]
            assert qrels[r["query_id"]] == {d: 1 for d in r["doc_ids"]}
            for doc_id in r["doc_ids"]:
                doc = corpus[doc_id]
                assert _occurs(r["answer"], doc["text"]), (r, doc["text"])
                # the question names its product's model code, the distinctive token of its documents
                assert doc["metadata"]["model"] in r["question"]


def test_near_duplicates_differ_in_one_spec(corpus):
    specs = [d["metadata"] for d in corpus.values() if d["metadata"]["doc_type"] == "spec"]
    families = defaultdict(list)
    for m in specs:
        families[(m["brand"], m["series"])].append(m)
    pairs = 0
    for members in families.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                differing = [k for k in a["specs"] if a["specs"][k] != b["specs"][k]]
                assert len(differing) == 1 and a["model"] != b["model"] and a["price"] != b["price"]
                pairs += 1
    assert pairs >= len(specs) // 5


def test_long_tail_brands_make_one_product(corpus):
    products_of = defaultdict(set)
    for d in corpus.values():
        products_of[d["metadata"]["brand"]].add(d["metadata"]["product_id"])
    rare = [b for b, ps in products_of.items() if b not in COMMON_BRANDS]
    assert len(rare) >= SIZES["quick"]["rare"] * 5 and all(len(products_of[b]) == 1 for b in rare)


def test_updates_change_an_existing_document_and_its_answer(wb, corpus):
    updates = list(read_jsonl(wb.updates))
    assert len(updates) == SIZES["quick"]["updates"] and {u["change"] for u in updates} == {"price", "stock"}
    assert len({u["doc_id"] for u in updates}) == len(updates)
    for u in updates:
        old = corpus[u["doc_id"]]
        assert u["old_answer"] != u["new_answer"]
        assert _occurs(u["old_answer"], old["text"]) and not _occurs(u["old_answer"], u["text"])
        assert _occurs(u["new_answer"], u["text"]) and not _occurs(u["new_answer"], old["text"])
        assert u["metadata"]["model"] in u["question"] and u["metadata"]["product_id"] == old["metadata"]["product_id"]
        field = u["change"]
        assert u["metadata"][field] != old["metadata"][field]
        assert {k: v for k, v in u["metadata"].items() if k != field} == \
               {k: v for k, v in old["metadata"].items() if k != field}


def test_general_text_has_no_product_entities(wb, corpus):
    entities = {d["metadata"][k] for d in corpus.values() for k in ("brand", "model")}
    general = " ".join(r["text"] for r in read_jsonl(wb.general))
    words = set(re.findall(r"[\w-]+", general))
    assert general and not words & entities
    domain = [r["text"] for r in read_jsonl(wb.domain)]
    assert len(domain) > len(corpus) and all(f"{d['title']}. {d['text']}" in domain for d in corpus.values())


@pytest.mark.parametrize("kw, match", [(dict(size="medium"), "size"), (dict(seed="0"), "seed")])
def test_generate_rejects_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        generate_worthbuying(tmp_path, **kw)


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_ids(wb, corpus, tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    assert tok.vocab_size <= 1024
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        SPECIAL_TOKEN_IDS["bos_token_id"], SPECIAL_TOKEN_IDS["eos_token_id"], SPECIAL_TOKEN_IDS["pad_token_id"])
    texts = [d["text"] for d in list(corpus.values())[:50]] + [r["question"] for r in read_jsonl(wb.qa_test)]
    texts.append("unseen: Ünïcödé ✓ 12345")  # byte-level: nothing is unknown
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and tok.token_to_id("<unk>") not in ids
        assert tok.decode(ids) == text
    # the domain's entities are whole tokens, so a tiny model sees them as units
    assert tok.token_to_id("Ġ" + next(iter(corpus.values()))["metadata"]["brand"]) is not None


def test_tokenizer_loads_in_transformers_with_the_same_ids_and_chat_template(wb, tok_dir):
    from transformers import AutoTokenizer

    ours, hf = Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    for r in list(read_jsonl(wb.qa_train))[:30]:
        assert ours.encode(r["question"]) == hf(r["question"]).input_ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_token_id, ours.eos_token_id,
                                                                   ours.pad_token_id)
    chat = [{"role": "user", "content": "What is the price?"}, {"role": "assistant", "content": "$99"}]
    rendered = ours.apply_chat_template(chat, add_generation_prompt=False)
    assert rendered == hf.apply_chat_template(chat, tokenize=False)
    assert rendered == "<s>user\nWhat is the price?</s>\n<s>assistant\n$99</s>\n"
    ids = ours.apply_chat_template(chat[:1], tokenize=True)
    assert ids.count(ours.eos_token_id) == 1 and ids.count(ours.bos_token_id) == 2


def test_tokenizer_trains_from_texts_and_plain_text_files(tmp_path):
    lines = ["the red kettle boils water fast", "a blue kettle boils water slowly"] * 20
    (tmp_path / "plain.txt").write_text("\n".join(lines) + "\n\n")
    a = Tokenizer.from_pretrained(train_bpe_tokenizer(lines, tmp_path / "a", vocab_size=300))
    b = Tokenizer.from_pretrained(train_bpe_tokenizer([str(tmp_path / "plain.txt")], tmp_path / "b", vocab_size=300))
    assert a.encode(lines[0]) == b.encode(lines[0])
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


@pytest.mark.parametrize("texts, kw, err, match", [
    ("just one string", {}, ValueError, "list"),
    (["some text"], dict(vocab_size=100), ValueError, "vocab_size"),
    (["some text"], dict(min_frequency=0), ValueError, "min_frequency"),
    ([], {}, ValueError, "no text"),
    ([b"bytes"], {}, ValueError, "texts or file paths"),
    ([Path("/nonexistent/corpus.jsonl")], {}, FileNotFoundError, "not found"),
])
def test_tokenizer_rejects_bad_input(tmp_path, texts, kw, err, match):
    with pytest.raises(err, match=match):
        train_bpe_tokenizer(texts, tmp_path / "tok", **kw)


def test_tokenizer_rejects_jsonl_without_text(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(ValueError, match='"text"'):
        train_bpe_tokenizer([path], tmp_path / "tok")
    assert not os.path.exists(tmp_path / "tok" / "tokenizer.json")
