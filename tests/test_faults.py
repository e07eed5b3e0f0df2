"""Faults: kill -9 in the middle of training (checkpoint saves included) and of `bsharedrag
index`, then resume: the final state equals an uninterrupted run's. A full disk during a
save raises and leaves the previous state loadable."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("hnswlib")

from bsharedrag_fast.cli.main import main  # noqa: E402
from bsharedrag_fast.index.hnsw import HNSWIndex  # noqa: E402
from bsharedrag_fast.train import RetrieverConfig, train_retriever  # noqa: E402
from train_tiny import beir_dir, model_dir, one_thread  # noqa: E402,F401  (one_thread: autouse)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
STEPS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"model": model_dir(root / "model"), "beir": beir_dir(root / "beir")}


def _config(tiny, out: str) -> RetrieverConfig:
    return RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=out, batch_size=4, num_negatives=2, r=4,
                           alpha=8, dropout=0.1, lr=1e-3, warmup_steps=2, steps=STEPS, save_every=1,
                           keep_checkpoints=2)


TRAIN = """
import sys, torch
torch.set_num_threads(1)
from bsharedrag_fast.train import RetrieverConfig, train_retriever
model, beir, out, steps = sys.argv[1:5]
train_retriever(RetrieverConfig(model=model, data=beir, out=out, batch_size=4, num_negatives=2, r=4, alpha=8,
                                dropout=0.1, lr=1e-3, warmup_steps=2, steps=int(steps), save_every=1,
                                keep_checkpoints=2))
"""


def _kill_when(cmd: list, ready, timeout: float = 120.0) -> bool:
    """Start cmd, SIGKILL it as soon as ready() is true; returns whether it was killed (not finished)."""
    p = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while p.poll() is None:
            if ready():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
            assert time.time() < deadline, "the run never reached the point to kill it at"
            time.sleep(0.0005)
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_kill_9_during_training_then_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    ref = train_retriever(_config(tiny, str(tmp_path / "ref")))
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    kills = 0
    for target in (2, 4, 6):  # kill while step-N is being written (or just after), three times over
        killed = _kill_when([sys.executable, str(script), tiny["model"], tiny["beir"], str(out), str(STEPS)],
                            lambda t=target: (ckpts / f"step-{t}.tmp").exists() or (ckpts / f"step-{t}").exists())
        kills += killed
    assert kills >= 2  # (a run this tiny may, on a loaded machine, finish before the poll sees step 6)
    resumed = train_retriever(_config(tiny, str(out)))  # picks up from the newest complete checkpoint
    assert resumed.losses == ref.losses  # bit for bit, over all STEPS steps
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    import bsharedrag_fast.train.checkpoint as C

    out = tmp_path / "r"
    real = C.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 4:  # the 3rd checkpoint (two files each): the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(C, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train_retriever(_config(tiny, str(out)))
    monkeypatch.setattr(C, "save_file", real)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-1", "step-2", "step-3.tmp"]  # the half one is only ever a .tmp
    ref = train_retriever(_config(tiny, str(tmp_path / "ref")))
    assert train_retriever(_config(tiny, str(out))).losses == ref.losses  # resumed from step 2


CORPUS = [{"_id": f"d{i}", "title": f"item {i}", "text": f"the quick brown fox number {i} jumps"} for i in range(40)]


def test_kill_9_during_index_then_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    args = ["--model", tiny["model"], "--corpus", str(corpus), "--batch-size", "2", "--save-every", "4",
            "--threads", "1"]
    assert main(["index", *args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bsharedrag_fast.cli", "index", *args, "--out", str(out)]
    manifest = out / "manifest.json"

    def saved(n):  # at least n documents saved; the run is embedding or saving the next ones
        def ready():
            try:
                return json.loads(manifest.read_text())["count"] >= n
            except (ValueError, KeyError, OSError):  # not there yet, or being replaced
                return False
        return ready

    kills = sum(_kill_when(cmd, saved(n)) for n in (8, 16, 24))
    assert kills >= 1
    assert main(["index", *args, "--out", str(out)]) == 0
    ref, got = HNSWIndex.load(str(tmp_path / "ref")), HNSWIndex.load(str(out))
    assert sorted(got.ids()) == sorted(ref.ids()) == sorted(d["_id"] for d in CORPUS)
    q = np.random.default_rng(0).standard_normal((5, ref.dim)).astype(np.float32)
    assert [[d for d, _ in h] for h in got.search(q, k=10)] == [[d for d, _ in h] for h in ref.search(q, k=10)]


def test_disk_full_during_an_index_save_keeps_the_previous_index(tmp_path):
    idx = HNSWIndex(8, space="ip")
    x = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
    idx.upsert([f"a{i}" for i in range(10)], x[:10])
    d = str(tmp_path / "idx")
    idx.save(d)
    idx.upsert([f"b{i}" for i in range(10)], x[10:])

    def full(stage, path):
        if stage == "docs_written":
            raise OSError(errno.ENOSPC, "No space left on device", path)

    with pytest.raises(OSError, match="No space left"):
        idx.save(d, on_stage=full)
    old = HNSWIndex.load(d)
    assert sorted(old.ids()) == sorted(f"a{i}" for i in range(10))
    idx.save(d)  # space again: the save goes through and cleans up the half one
    assert len(HNSWIndex.load(d)) == 20 and sorted(os.listdir(tmp_path)) == ["idx"]
