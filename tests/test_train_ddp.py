"""torchrun with 2 CPU processes (gloo) vs 1 process on the same global batch: the loss, the
gradient norm of every step and the trained weights match (pre-training, and the Fully-shared
loss, which covers the cross-device InfoNCE and the answer-token loss)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bsharedrag_fast.train import PretrainConfig, RetrieverConfig, pretrain, train_retriever
from train_tiny import beir_dir, model_dir, qa_rows, write_jsonl

WORKER = '''
import sys, torch
torch.set_num_threads(1)
from bsharedrag_fast.train import PretrainConfig, RetrieverConfig, pretrain, train_retriever
import json
kw = json.loads(sys.argv[1])
pretrain(PretrainConfig(**kw["pretrain"]))
train_retriever(RetrieverConfig(**kw["retriever"]))
'''


def _configs(tmp_path, out: str) -> dict:
    model = str(tmp_path / "model")
    if not (tmp_path / "beir").exists():
        model_dir(tmp_path / "model")
        beir_dir(tmp_path / "beir")
        write_jsonl(tmp_path / "qa.jsonl", qa_rows())
        write_jsonl(tmp_path / "text.jsonl", [{"text": f"the quick brown fox {i} jumps"} for i in range(10)])
    common = dict(steps=3, warmup_steps=1, save_every=0, grad_accum=2)
    return {
        "pretrain": dict(model=model, out=str(tmp_path / out / "pt"), domain=[str(tmp_path / "text.jsonl")],
                         domain_ratio=1.0, seq_len=12, batch_size=4, lr=1e-3, **common),
        "retriever": dict(model=model, data=str(tmp_path / "beir"), out=str(tmp_path / out / "fs"), batch_size=4,
                          num_negatives=2, r=4, alpha=8, dropout=0.0, lr=1e-3, fully_shared=True,
                          gen_data=str(tmp_path / "qa.jsonl"), gen_batch_size=2, context_tokens=40, **common),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: str) -> list:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_two_processes_match_one(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _configs(tmp_path, "one")
        pretrain(PretrainConfig(**one["pretrain"]))
        train_retriever(RetrieverConfig(**one["retriever"]))
    finally:
        torch.set_num_threads(n)
    two = _configs(tmp_path, "two")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(tmp_path / "worker.py"), json.dumps(two)],
        env=env, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage, weights in (("pt", "model.safetensors"), ("fs", "adapter_model.safetensors")):
        m1, m2 = _metrics(str(tmp_path / "one" / stage)), _metrics(str(tmp_path / "two" / stage))
        assert len(m1) == len(m2) == 3
        for a, b in zip(m1, m2):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), stage
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), stage
            assert b["tokens"] == a["tokens"]
        w1 = load_file(str(tmp_path / "one" / stage / weights))
        w2 = load_file(str(tmp_path / "two" / stage / weights))
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5), (stage, k)
