"""HNSWIndex: recall vs brute force, upsert/delete/growth, persistence, crash-safe save, embedder checks."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("hnswlib")

from bsharedrag_fast.index.hnsw import HNSWIndex  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMB = {"model": "/models/tiny", "adapter": "retrieval", "pooling": "last", "prefix": "passage: "}


def unit(rng, n, d=64):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit(rng, 10_000), unit(rng, 200)


def small_index(n=50, space="ip", seed=1, **kw):
    rng = np.random.default_rng(seed)
    x = unit(rng, n, 16)
    idx = HNSWIndex(16, space=space, **kw)
    ids = [f"doc{i}" for i in range(n)]
    idx.upsert(ids, x, [{"title": f"t{i}", "text": f"text {i}", "metadata": {"i": i}} for i in range(n)])
    return idx, ids, x


@pytest.mark.parametrize("space", ["ip", "l2", "cosine"])
def test_recall_at_10_vs_brute_force(data, space):
    X, Q = data
    ids = [f"d{i}" for i in range(len(X))]
    t0 = time.perf_counter()
    idx = HNSWIndex(64, space=space)
    idx.upsert(ids, X)
    t1 = time.perf_counter()
    hits = idx.search(Q, k=10)
    t2 = time.perf_counter()
    if space == "l2":
        d = ((Q[:, None, :] - X[None]) ** 2).sum(-1)
        gt = np.argsort(d, axis=1)[:, :10]
        exact_best = -d[np.arange(len(Q)), gt[:, 0]]
    else:
        s = Q @ X.T
        gt = np.argsort(-s, axis=1)[:, :10]
        exact_best = s[np.arange(len(Q)), gt[:, 0]]
    recall = np.mean([len({h[0] for h in hs} & {ids[j] for j in g}) / 10 for hs, g in zip(hits, gt)])
    print(f"\n{space}: recall@10={recall:.4f} build={t1 - t0:.2f}s search(200q)={t2 - t1:.3f}s")
    assert recall >= 0.98
    # scores: higher is better, sorted, and equal the exact similarity (ip/cosine) or -squared L2.
    for hs, eb in zip(hits, exact_best):
        sc = [s for _, s in hs]
        assert sc == sorted(sc, reverse=True)
        assert sc[0] <= eb + 1e-4
    top = hits[0][0]
    j = int(top[0][1:])
    want = -float(((Q[0] - X[j]) ** 2).sum()) if space == "l2" else float(Q[0] @ X[j])
    assert top[1] == pytest.approx(want, abs=1e-4)


def test_upsert_replaces_vector_and_doc():
    idx, ids, x = small_index()
    old = x[3].copy()
    new = -old
    idx.upsert(["doc3"], new, [{"title": "new", "text": "replaced"}])
    assert len(idx) == 50
    assert idx.search(old, k=1)[0][0][0] != "doc3"
    assert all(h[0] != "doc3" for h in idx.search(old, k=5)[0])
    top = idx.search(new, k=1)[0][0]
    assert top[0] == "doc3" and top[1] == pytest.approx(1.0, abs=1e-5)
    assert idx.get("doc3")["text"] == "replaced" and idx.get("doc3")["title"] == "new"
    # docs=None keeps the stored doc, replaces only the vector
    idx.upsert(["doc3"], old)
    assert idx.get("doc3")["text"] == "replaced"
    assert idx.search(old, k=1)[0][0][0] == "doc3"
    # every id appears at most once, even with k = len
    got = [h[0] for h in idx.search(old, k=len(idx))[0]]
    assert sorted(got) == sorted(ids)
    # many rounds of upserts: deleted slots are compacted away instead of growing the graph forever
    cap = idx.capacity
    for _ in range(30):
        idx.upsert(ids, x)
    assert idx.capacity == cap and len(idx) == 50 and idx._hnsw.get_current_count() <= cap
    assert [hs[0][0] for hs in idx.search(x, k=1)] == ids


def test_compact(tmp_path):
    idx, ids, x = small_index(n=100)
    idx.delete(ids[:60])
    idx.upsert(ids[60:70], -x[60:70])
    idx.compact()
    assert idx._hnsw.get_current_count() == 40 and len(idx) == 40
    assert [hs[0][0] for hs in idx.search(x[70:], k=1)] == ids[70:]
    assert [hs[0][0] for hs in idx.search(-x[60:70], k=1)] == ids[60:70]
    idx.upsert(["fresh"], x[0])
    idx.save(str(tmp_path / "c"))
    j = HNSWIndex.load(str(tmp_path / "c"))
    assert len(j) == 41 and j.search(x[0], k=1)[0][0][0] == "fresh"
    j.upsert(["fresh2"], x[1])
    assert j.search(x[1], k=1)[0][0][0] == "fresh2"


def test_delete_never_returned():
    idx, ids, x = small_index()
    gone = ids[:20]
    assert idx.delete(gone + ["not-there"]) == 20
    assert len(idx) == 30 and "doc0" not in idx and "doc20" in idx
    with pytest.raises(KeyError):
        idx.get("doc0")
    for k in (1, 10, len(idx), 1000):
        for hs in idx.search(x, k=k):
            assert not {h[0] for h in hs} & set(gone)
            assert len(hs) == min(k, 30)
    # re-adding a deleted id works
    idx.upsert(["doc0"], x[0], ["back"])
    assert idx.search(x[0], k=1)[0][0][0] == "doc0" and idx.get("doc0")["text"] == "back"
    # delete everything: searches return empty lists
    idx.delete(idx.ids())
    assert len(idx) == 0 and idx.search(x[:2], k=5) == [[], []]


def test_growth_past_initial_capacity():
    rng = np.random.default_rng(2)
    x = unit(rng, 300, 16)
    idx = HNSWIndex(16, initial_capacity=8)
    for s in range(0, 300, 37):
        idx.upsert([f"g{i}" for i in range(s, min(s + 37, 300))], x[s:s + 37])
    assert len(idx) == 300 and idx.capacity >= 300
    hits = idx.search(x, k=1)
    assert np.mean([hs[0][0] == f"g{i}" for i, hs in enumerate(hits)]) >= 0.99


def test_torch_input_and_1d_query():
    torch = pytest.importorskip("torch")
    idx, ids, x = small_index()
    t = torch.from_numpy(x[:5]).to(torch.bfloat16)
    idx.upsert(["tb"], t[0])
    assert len(idx) == 51
    h1 = idx.search(torch.from_numpy(x[7]), k=3)
    assert len(h1) == 1 and h1[0][0][0] == "doc7"


def test_save_load_round_trip(tmp_path):
    idx, ids, x = small_index(n=200, embedder=EMB)
    idx.delete(["doc5"])
    idx.upsert(["doc6"], -x[6], ["six"])
    before = idx.search(x, k=10)
    d = tmp_path / "idx"
    idx.save(str(d))
    assert sorted(os.listdir(d)) == ["docs.sqlite", "index.bin", "manifest.json"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["count"] == 199 and m["dim"] == 16 and m["space"] == "ip" and m["embedder"] == EMB
    j = HNSWIndex.load(str(d), embedder=dict(EMB), verify=True)
    assert len(j) == 199 and "doc5" not in j and j.get("doc6")["text"] == "six"
    assert j.get("doc7") == {"id": "doc7", "title": "t7", "text": "text 7", "metadata": {"i": 7}}
    after = j.search(x, k=10)
    assert [[h[0] for h in hs] for hs in after] == [[h[0] for h in hs] for hs in before]
    np.testing.assert_allclose([[h[1] for h in hs] for hs in after], [[h[1] for h in hs] for hs in before],
                               atol=1e-6)
    # the loaded index keeps working (new labels do not collide) and re-saves over the old dir
    j.upsert(["new"], x[0] * -1)
    assert j.search(-x[0], k=1)[0][0][0] == "new"
    j.save(str(d))
    k2 = HNSWIndex.load(str(d))
    assert len(k2) == 200 and k2.generation == 2
    assert [e for e in os.listdir(tmp_path) if e != "idx"] == []


def test_embedder_mismatch(tmp_path):
    idx, _, x = small_index(embedder=EMB)
    idx.search(x[0], k=1, embedder=EMB)
    with pytest.raises(ValueError, match="pooling"):
        idx.search(x[0], k=1, embedder={**EMB, "pooling": "mean"})
    with pytest.raises(ValueError, match="adapter"):
        idx.upsert(["z"], x[0], embedder={**EMB, "adapter": "other"})
    d = str(tmp_path / "idx")
    idx.save(d)
    with pytest.raises(ValueError, match="model.*other"):
        HNSWIndex.load(d, embedder={**EMB, "model": "/models/other"})
    with pytest.raises(ValueError, match="prefix"):
        HNSWIndex.load(d).search(x[0], k=1, embedder={**EMB, "prefix": "query: "})
    assert len(HNSWIndex.load(d, embedder=EMB)) == 50


def test_corrupt_dirs(tmp_path):
    idx, _, _ = small_index()
    d = tmp_path / "idx"
    idx.save(str(d))
    with pytest.raises(ValueError, match="does not exist"):
        HNSWIndex.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json"):
        HNSWIndex.load(str(tmp_path / "empty"))
    good = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="manifest.json"):
        HNSWIndex.load(str(d))
    (d / "manifest.json").write_text(good)
    blob = (d / "index.bin").read_bytes()
    (d / "index.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="index.bin"):
        HNSWIndex.load(str(d))
    (d / "index.bin").unlink()
    with pytest.raises(ValueError, match="index.bin"):
        HNSWIndex.load(str(d))
    (d / "index.bin").write_bytes(blob)
    db = (d / "docs.sqlite").read_bytes()
    (d / "docs.sqlite").write_bytes(b"\0" * len(db))  # same size, garbage content
    with pytest.raises(ValueError, match="docs.sqlite"):
        HNSWIndex.load(str(d))
    with pytest.raises(ValueError, match="docs.sqlite"):
        HNSWIndex.load(str(d), verify=True)
    (d / "docs.sqlite").write_bytes(db)
    assert len(HNSWIndex.load(str(d), verify=True)) == 50


def test_bad_inputs():
    idx, _, x = small_index()
    with pytest.raises(ValueError, match="vectors"):
        idx.upsert(["a"], np.zeros((1, 15), np.float32))
    with pytest.raises(ValueError, match="vectors"):
        idx.search(np.zeros((2, 17), np.float32), k=1)
    nan = x[:1].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        idx.upsert(["a"], nan)
    with pytest.raises(ValueError, match="NaN"):
        idx.search(nan, k=1)
    with pytest.raises(ValueError, match="duplicate"):
        idx.upsert(["a", "a"], x[:2])
    with pytest.raises(ValueError, match="doc_ids"):
        idx.upsert(["a", ""], x[:2])
    with pytest.raises(ValueError, match="doc_ids"):
        idx.upsert([], x[:0])
    with pytest.raises(ValueError, match="doc_ids"):
        idx.upsert("a", x[:1])
    with pytest.raises(ValueError, match="rows"):
        idx.upsert(["a", "b"], x[:3])
    with pytest.raises(ValueError, match="docs"):
        idx.upsert(["a", "b"], x[:2], ["only one"])
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k"):
            idx.search(x[0], k=k)
    with pytest.raises(ValueError, match="space"):
        HNSWIndex(16, space="dot")
    with pytest.raises(ValueError, match="dim"):
        HNSWIndex(0)
    assert len(idx) == 50  # nothing half-applied


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import bsharedrag_fast.index.hnsw as I
    d, stage, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    idx = I.HNSWIndex.load(d)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((100, 16)).astype(np.float32)
    idx.upsert([f"v2-{i}" for i in range(100)], x)   # version 2 = version 1 + 100 docs
    def hook(s, path):
        if s == stage:
            open(marker, "w").write(path)
            time.sleep(600)
    idx.save(d, on_stage=hook)
""")


@pytest.mark.parametrize("stage,expect_new", [
    ("tmp_created", False), ("index_written", False), ("docs_written", False),
    ("committed", False), ("old_moved_aside", True), ("new_in_place", True),
])
def test_crash_safe_save(tmp_path, stage, expect_new):
    idx, ids, x = small_index()
    d = str(tmp_path / "idx")
    idx.save(d)
    before = idx.search(x[:5], k=3)
    marker = str(tmp_path / "marker")
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, str(script), d, stage, marker], env=env, cwd=REPO)
    try:
        deadline = time.time() + 60
        while not os.path.exists(marker):
            assert p.poll() is None, f"saver exited early with {p.returncode}"
            assert time.time() < deadline, "saver never reached the stage"
            time.sleep(0.02)
        time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    if stage == "old_moved_aside":
        assert not os.path.exists(d)  # the crash window this protocol must recover from
    j = HNSWIndex.load(d, verify=True)
    if expect_new:
        assert len(j) == 150 and "v2-0" in j
    else:
        assert len(j) == 50 and "v2-0" not in j
        assert [[h[0] for h in hs] for hs in j.search(x[:5], k=3)] == [[h[0] for h in hs] for hs in before]
    assert all(i in j for i in ids)
    assert j.get("doc1")["text"] == "text 1"
    # a later save cleans up the leftovers of the crashed one
    j.save(d)
    assert sorted(os.listdir(tmp_path)) == ["crash.py", "idx", "marker"]
    assert len(HNSWIndex.load(d)) == len(j)


@pytest.mark.parametrize("space", ["ip", "l2"])
def test_heavily_deleted_graph_still_fills_k(space):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    ids = [f"h{i}" for i in range(2000)]
    idx = HNSWIndex(16, space=space, M=4, ef=10)  # a sparse graph, so hnswlib alone may come up short
    idx.upsert(ids, x)
    idx.delete(ids[:1950])
    for hs in idx.search(x[:10], k=50):
        assert {h[0] for h in hs} == set(ids[1950:])


def test_exact_fallback_when_hnswlib_fails():
    idx, ids, x = small_index(space="l2")

    class Failing:  # hnswlib raising "cannot return the results" for every query
        def __init__(self, h):
            self.h = h

        def knn_query(self, *a, **k):
            raise RuntimeError("Cannot return the results in a contiguous 2D array")

        def __getattr__(self, name):
            return getattr(self.h, name)

    idx._hnsw = Failing(idx._hnsw)
    hits = idx.search(x[:3], k=3)
    assert [hs[0][0] for hs in hits] == ["doc0", "doc1", "doc2"]
    assert hits[0][0][1] == pytest.approx(0.0, abs=1e-6)
    d = ((x[0] - x) ** 2).sum(1)
    assert [h[0] for h in hits[0]] == [ids[j] for j in np.argsort(d)[:3]]
