"""`bsharedrag demo --data DIR --base MODEL`: the demo's pipeline on a user's BEIR set, with and
without answers, on a tiny random "pretrained" model (the pipeline, not the figures, is tested)."""
import dataclasses
import json

import pytest

from bsharedrag_fast.cli.main import main
from bsharedrag_fast.demo.pipeline import PRETRAINED_PLANS, run_demo
from bsharedrag_fast.demo.user_data import prepare, read_answers
from train_tiny import beir_dir, model_dir, write_jsonl

SMOKE = dataclasses.replace(PRETRAINED_PLANS["quick"], cpt_steps=2, retriever_steps=2, separate_steps=2,
                            generator_steps=2, mine_k=3, eval_questions=4, max_new_tokens=3, bf16=False,
                            retriever_batch=4, generator_batch=2, pretrain_batch=2, seq_len=32)
N = 12


def _user_set(root, answers: bool):
    data = beir_dir(root / "data", n=N)
    # a test split, a title-only document, and answers under two BEIR-style id names
    (root / "data" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                      + "".join(f"q{i}\td{i}\t1\n" for i in range(8, N)))
    (root / "data" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                       + "".join(f"q{i}\td{i}\t1\n" for i in range(8)))
    with open(root / "data" / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "title-only", "title": "a document that is only a title", "text": ""}) + "\n")
    if answers:
        write_jsonl(root / "data" / "answers.jsonl",
                    [{("query_id" if i % 2 else "_id"): f"q{i}", "answer": f"answer {i}"} for i in range(N)])
    return data


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("base") / "model")


@pytest.mark.parametrize("answers", [True, False])
def test_demo_runs_on_a_users_data(base, tmp_path, answers):
    data = _user_set(tmp_path, answers)
    res = run_demo(str(tmp_path / "out"), plan=SMOKE, base=base, data=data)
    assert res["data"] == data and res["base"] == base
    assert {"BSharedRAG", "w/o hard negatives", "w/o continual pre-training"} <= set(res["retrieval"])
    assert ("Fully-shared" in res["retrieval"]) == answers
    assert bool(res["generation"]) == answers and ("answer_accuracy" in res["goals"]) == answers
    assert res["updates"] == [] and "updates" not in res["goals"]
    assert len(res["loss_curves"]["cpt"]) == SMOKE.cpt_steps
    if answers:
        assert len(res["samples"]) == N - 8  # every test question with an answer
        assert (tmp_path / "out" / "adapters" / "generation" / "rag_prompt.json").is_file()
    assert (tmp_path / "out" / "report" / "report.md").is_file()


def test_answers_file_errors(tmp_path):
    data = _user_set(tmp_path, answers=False)
    path = tmp_path / "data" / "answers.jsonl"
    write_jsonl(path, [{"qid": "q1", "answer": "x"}, {"query_id": "q1", "answer": "y"}])
    with pytest.raises(ValueError, match=r"answers.jsonl:2: a second answer for query 'q1'"):
        read_answers(str(path))
    write_jsonl(path, [{"answer": "x"}])
    with pytest.raises(ValueError, match=r"answers.jsonl:1: no query id"):
        read_answers(str(path))
    write_jsonl(path, [{"_id": "nope", "answer": "x"}])
    with pytest.raises(ValueError, match="1 answers name queries in neither qrels split"):
        prepare(data, str(tmp_path / "work"))


def test_demo_data_needs_a_pretrained_base(tmp_path, capsys):
    data = _user_set(tmp_path, answers=False)
    assert main(["demo", "--data", data, "--base", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "--data needs a pretrained --base" in capsys.readouterr().err
