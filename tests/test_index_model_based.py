"""Model-based check of HNSWIndex (hypothesis): after any sequence of upserts, deletes,
saves, loads and compactions, the index equals a plain dict {id: (vector, doc)} and an
exhaustive search over it returns the dict's exact ranking."""
import shutil
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("hnswlib")

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

from bsharedrag_fast.index.hnsw import HNSWIndex  # noqa: E402

DIM = 4
IDS = st.sampled_from([f"d{i}" for i in range(12)] + ["ü-ñ", "a b", "x" * 40])
VEC = st.lists(st.integers(-4, 4), min_size=DIM, max_size=DIM).filter(any)


class IndexEqualsDict(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.idx = HNSWIndex(DIM, space="ip", initial_capacity=2, embedder={"model": "m"})
        self.ref: dict = {}

    def teardown(self):
        self.idx.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(items=st.dictionaries(IDS, VEC, min_size=1, max_size=5), keep_docs=st.booleans())
    def upsert(self, items, keep_docs):
        ids = list(items)
        vecs = np.array([items[i] for i in ids], dtype=np.float32)
        docs = None if keep_docs else [{"title": f"t-{i}", "text": f"text of {i} {vecs[n].tolist()}"}
                                       for n, i in enumerate(ids)]
        self.idx.upsert(ids, vecs, docs)
        for n, i in enumerate(ids):
            old_doc = self.ref[i][1] if i in self.ref else ("", "")
            self.ref[i] = (vecs[n], old_doc if docs is None else (docs[n]["title"], docs[n]["text"]))

    @rule(ids=st.lists(IDS, min_size=1, max_size=4, unique=True))
    def delete(self, ids):
        self.idx.delete(ids)
        for i in ids:
            self.ref.pop(i, None)

    @rule()
    def save_and_load(self):
        path = f"{self.dir}/idx"
        self.idx.save(path)
        self.idx.close()
        self.idx = HNSWIndex.load(path, embedder={"model": "m"})

    @rule()
    def compact(self):
        self.idx.compact()

    @invariant()
    def equals_the_dict(self):
        assert len(self.idx) == len(self.ref)
        assert sorted(self.idx.ids()) == sorted(self.ref)
        for i, (_, (title, text)) in self.ref.items():
            doc = self.idx.get(i)
            assert (doc["title"], doc["text"]) == (title, text)
        if self.ref:
            q = np.array([1.0, -0.5, 0.25, 2.0], dtype=np.float32)
            hits = self.idx.search(q, k=len(self.ref))[0]
            want = sorted(((float(v @ q), i) for i, (v, _) in self.ref.items()), reverse=True)
            assert sorted(s for _, s in hits) == pytest.approx(sorted(s for s, _ in want), abs=1e-5)
            assert {d for d, _ in hits} == set(self.ref)


TestIndexEqualsDict = IndexEqualsDict.TestCase
TestIndexEqualsDict.settings = settings(max_examples=25, stateful_step_count=15, deadline=None, database=None)
