"""HNSWIndex: an approximate nearest-neighbour index (hnswlib) with string doc ids and a SQLite doc store.

    idx = HNSWIndex(dim, space="ip", embedder={"model": path, "adapter": name, "pooling": "last", ...})
    idx.upsert(["a", "b"], vectors, [{"title": "...", "text": "...", "metadata": {...}}, "plain text"])
    idx.delete(["a"])
    hits = idx.search(queries, k=10)        # per query: [(doc_id, score), ...], best first
    idx.save("my_index"); idx = HNSWIndex.load("my_index", embedder=...)

Scores (higher is always better):
  * space="ip":     the inner product <q, d>.
  * space="cosine": the cosine similarity (hnswlib normalises stored and query vectors).
  * space="l2":     minus the *squared* Euclidean distance, -||q - d||^2.

Ids and labels.  hnswlib labels are ints; the SQLite table ``docs(id TEXT PRIMARY KEY, label INTEGER
UNIQUE, title, text, metadata JSON)`` maps each string id to its current label.  Labels are never reused:
every upsert gives a vector a fresh label from a monotonic counter.  Upserting an existing id marks the
old label deleted in hnswlib (``mark_deleted``) and appends the new vector under a fresh label.  hnswlib's
in-place ``replace_deleted`` was measured about 25x slower (re-upserting 5k of 10k 64-d vectors: 17 s
against 0.7 s), so it is not used.  hnswlib never returns deleted labels, and every hit is mapped back
through SQLite, so deleted docs are never returned.  When the graph is full it is resized (capacity
doubles) without a rebuild -- unless at least half of its slots hold deleted vectors, in which case it is
compacted instead (rebuilt from the live vectors, amortised O(1) per deletion); ``compact()`` does the
same on demand.

Defaults M=32, ef_construction=200, ef=128: recall@10 about 0.995 against brute force on 10k random
unit 64-d vectors (ip, l2 and cosine); M=16 at ef=128 gave about 0.944.  ``set_ef`` trades speed for
recall at query time.  If hnswlib returns fewer than k live neighbours (a sparse, heavily deleted
graph), the query is retried with a larger ef, then answered exactly from the stored vectors.

Working copy.  A live index keeps its documents in a private SQLite file in a temporary directory
(removed when the index is closed or garbage-collected); the saved directory is never written in place.

Saved directory layout: ``index.bin`` (hnswlib), ``docs.sqlite`` (sqlite3 backup API) and
``manifest.json`` (format version, dim, space, params, count, embedder, file sizes and sha256).

Save protocol (for ``save(D)``; P is D's parent, N its name):
  1. write index.bin and docs.sqlite into a fresh ``P/.N.tmp-<random>``, fsync them; then write
     manifest.json there (last: a dir with a valid manifest is complete), fsync it and the temp dir.
  2. if D exists, rename it to ``P/.N.old-<random>``; rename the temp dir to D; fsync P.
  3. remove the ``.old-`` dir (and any leftovers of earlier crashed saves).
``load(D)`` reads D whenever D exists; only when D is missing does it look at the siblings.
Crash windows:
  * during 1, or after it but before the first rename: D is untouched and loads as the previous
    version; the temp dir is ignored (and removed by the next save).
  * between the two renames of 2: D does not exist.  ``load(D)`` recovers: among the ``.N.tmp-*`` and
    ``.N.old-*`` siblings with a complete, valid manifest it takes the one with the highest save
    generation (the new version, whose manifest was committed) and renames it to D.
  * during 3: D is the new version; the leftover ``.old-`` dir is ignored and removed by the next save.
Concurrent saves to the same directory from several processes are not supported.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..model.fingerprint import sha256_file

FORMAT_VERSION = 1
SPACES = ("ip", "cosine", "l2")
INDEX_FILE, DOCS_FILE, MANIFEST_FILE = "index.bin", "docs.sqlite", "manifest.json"

log = logging.getLogger("bsharedrag.index")

def _hnswlib():
    try:
        import hnswlib
    except ImportError as e:  # pragma: no cover
        raise ImportError("HNSWIndex needs hnswlib: pip install hnswlib") from e
    return hnswlib


def _canon(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/float keys compare the same as after a save."""
    return None if obj is None else json.loads(json.dumps(obj, sort_keys=True, default=str))


def _embedder_diff(stored: Any, given: Any) -> str:
    if isinstance(stored, dict) and isinstance(given, dict):
        keys = sorted(set(stored) | set(given))
        parts = [f"{k}: index has {stored.get(k, '<missing>')!r}, given {given.get(k, '<missing>')!r}"
                 for k in keys if stored.get(k, "<missing>") != given.get(k, "<missing>")]
        return "; ".join(parts)
    return f"index has {stored!r}, given {given!r}"


def _to_matrix(vectors: Any, dim: int, name: str = "vectors") -> np.ndarray:
    if hasattr(vectors, "detach"):  # torch tensor, without importing torch here
        vectors = vectors.detach().to("cpu").float().numpy()
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as a float32 array ({e})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name}: expected shape [n, {dim}] or [{dim}], got {list(np.shape(vectors))}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return np.ascontiguousarray(arr)


def _norm_doc(doc: Any, doc_id: str) -> tuple[str, str, str]:
    """(title, text, metadata JSON) from a str or a dict with title/text/metadata (other keys -> metadata)."""
    if doc is None:
        return "", "", "{}"
    if isinstance(doc, str):
        return "", doc, "{}"
    if not isinstance(doc, dict):
        raise ValueError(f"docs: doc for id {doc_id!r} must be a dict or a str, got {type(doc).__name__}")
    if "id" in doc and str(doc["id"]) != doc_id:
        raise ValueError(f"docs: doc for id {doc_id!r} carries a different id {doc['id']!r}")
    meta = dict(doc.get("metadata") or {})
    for k, v in doc.items():
        if k not in ("id", "_id", "title", "text", "metadata"):
            meta[k] = v
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"docs: metadata of {doc_id!r} is not JSON-serialisable ({e})") from None
    return str(doc.get("title") or ""), str(doc.get("text") or ""), meta_json


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_manifest(d: str) -> dict:
    """Manifest of a saved dir, checked for completeness; ValueError naming the path otherwise."""
    path = os.path.join(d, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"not an index directory: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt index manifest {path}: {e}") from None
    need = ("version", "dim", "space", "M", "ef_construction", "ef", "count", "next_label", "files")
    if not isinstance(m, dict) or any(k not in m for k in need):
        raise ValueError(f"corrupt index manifest {path}: missing fields "
                         f"{[k for k in need if not isinstance(m, dict) or k not in m]}")
    if m["version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported index format version {m['version']!r} "
                         f"(this code reads {FORMAT_VERSION})")
    if m["space"] not in SPACES or not isinstance(m["dim"], int) or m["dim"] < 1:
        raise ValueError(f"corrupt index manifest {path}: bad space/dim {m['space']!r}/{m['dim']!r}")
    for k, low in (("M", 2), ("ef_construction", 1), ("ef", 1), ("count", 0), ("next_label", 0), ("capacity", 0),
                   ("generation", 0)):
        v = m.get(k, low)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"corrupt index manifest {path}: {k} must be an int >= {low}, got {v!r}")
    if m.get("embedder") is not None and not isinstance(m["embedder"], dict):
        raise ValueError(f"corrupt index manifest {path}: embedder must be an object, got {m['embedder']!r}")
    for name in (INDEX_FILE, DOCS_FILE):
        fp = os.path.join(d, name)
        info = m["files"].get(name) if isinstance(m["files"], dict) else None
        if not os.path.isfile(fp):
            raise ValueError(f"corrupt index directory: {fp} is missing")
        if not isinstance(info, dict) or os.path.getsize(fp) != info.get("size"):
            raise ValueError(f"corrupt index directory: {fp} has size {os.path.getsize(fp)}, "
                             f"manifest says {info.get('size') if isinstance(info, dict) else None}")
    return m


def _siblings(d: str, kind: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(d))
    prefix = f".{name}.{kind}-"
    try:
        return [os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefix)]
    except FileNotFoundError:
        return []


def _recover(d: str) -> None:
    """If d is missing because a save crashed between its two renames, move the newest complete copy in."""
    if os.path.exists(d):
        return
    best = None
    for cand in _siblings(d, "tmp") + _siblings(d, "old"):
        try:
            m = _read_manifest(cand)
        except ValueError:
            continue
        key = (m.get("generation", 0), m.get("saved_at", 0.0))
        if best is None or key > best[0]:
            best = (key, cand)
    if best is not None:
        os.rename(best[1], d)
        _fsync_dir(os.path.dirname(os.path.abspath(d)))


class HNSWIndex:
    """Approximate k-NN over string doc ids; see the module docstring for scores, upserts and saves."""

    def __init__(self, dim: int, space: str = "ip", M: int = 32, ef_construction: int = 200, ef: int = 128,
                 embedder: Any = None, initial_capacity: int = 1024, num_threads: int = -1):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        for name, v in (("M", M), ("ef_construction", ef_construction), ("ef", ef),
                        ("initial_capacity", initial_capacity)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim, self.space, self.M, self.ef_construction, self.ef = dim, space, M, ef_construction, ef
        self.embedder = _canon(embedder)
        self.num_threads = num_threads
        self.generation = 0
        self._next_label = 0
        self._hnsw = _hnswlib().Index(space=space, dim=dim)
        self._hnsw.init_index(max_elements=initial_capacity, M=M, ef_construction=ef_construction,
                              random_seed=100)
        self._hnsw.set_ef(ef)
        self._open_db(None)

    # ------------------------------------------------------------------ doc store

    def _open_db(self, src: str | None) -> None:
        self._workdir = tempfile.mkdtemp(prefix="hnswindex-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._workdir, True)
        path = os.path.join(self._workdir, DOCS_FILE)
        if src is not None:
            try:
                s = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
                try:
                    d = sqlite3.connect(path)
                    s.backup(d)
                    d.close()
                finally:
                    s.close()
            except sqlite3.DatabaseError as e:
                raise ValueError(f"corrupt index doc store {src}: {e}") from None
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=MEMORY")  # a private working copy: no durability needed
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, label INTEGER UNIQUE NOT NULL, "
                         "title TEXT, text TEXT, metadata TEXT)")
        self._db.commit()

    def close(self) -> None:
        """Release the working copy (the saved directory is untouched)."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._db.execute(
            "SELECT 1 FROM docs WHERE id = ?", (doc_id,)).fetchone() is not None

    def __repr__(self) -> str:
        return f"HNSWIndex(dim={self.dim}, space={self.space!r}, count={len(self)}, M={self.M}, ef={self.ef})"

    @property
    def capacity(self) -> int:
        return self._hnsw.get_max_elements()

    def set_ef(self, ef: int) -> None:
        if not isinstance(ef, int) or ef < 1:
            raise ValueError(f"ef must be a positive int, got {ef!r}")
        self.ef = ef
        self._hnsw.set_ef(ef)

    def get(self, doc_id: str) -> dict:
        """The stored doc: {"id", "title", "text", "metadata"}; KeyError if absent."""
        row = self._db.execute("SELECT title, text, metadata FROM docs WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            raise KeyError(doc_id)
        return {"id": doc_id, "title": row[0] or "", "text": row[1] or "", "metadata": json.loads(row[2] or "{}")}

    def ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM docs ORDER BY label")]

    def check_embedder(self, embedder: Any, allow_mismatch: bool = False) -> None:
        """ValueError naming what differs when `embedder` is given and differs from the index's
        (with allow_mismatch: a logged warning). An index saved without an embedder record
        accepts any embedder (nothing to compare)."""
        if embedder is None or self.embedder is None:
            return
        given = _canon(embedder)
        if given != self.embedder:
            why = f"embedder mismatch: these vectors come from a different embedder than the index " \
                  f"({_embedder_diff(self.embedder, given)})"
            if not allow_mismatch:
                raise ValueError(why)
            log.warning("%s; used anyway (allow_mismatch)", why)

    # ------------------------------------------------------------------ writes

    @staticmethod
    def _check_ids(doc_ids: Any, name: str = "doc_ids") -> list[str]:
        if isinstance(doc_ids, str):
            raise ValueError(f"{name} must be a list of str, got a single str")
        ids = list(doc_ids)
        for i in ids:
            if not isinstance(i, str) or not i:
                raise ValueError(f"{name}: ids must be non-empty str, got {i!r}")
        return ids

    def upsert(self, doc_ids: Sequence[str], vectors: Any, docs: Sequence[Any] | None = None,
               embedder: Any = None) -> None:
        """Add or replace docs.  An existing id's vector is replaced (the old one is never returned again);
        its stored doc is replaced too, or kept when `docs` is None."""
        self.check_embedder(embedder)
        ids = self._check_ids(doc_ids)
        if not ids:
            raise ValueError("doc_ids is empty")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"doc_ids: duplicate ids in one upsert: {dup}")
        vecs = _to_matrix(vectors, self.dim)
        if vecs.shape[0] != len(ids):
            raise ValueError(f"vectors: {vecs.shape[0]} rows for {len(ids)} doc_ids")
        if docs is not None:
            docs = list(docs)
            if len(docs) != len(ids):
                raise ValueError(f"docs: {len(docs)} docs for {len(ids)} doc_ids")
            rows = [_norm_doc(d, i) for d, i in zip(docs, ids)]
        if self.space == "cosine" and (np.linalg.norm(vecs, axis=1) == 0).any():
            raise ValueError("vectors: zero vector in a cosine index")

        old = {}
        for s in range(0, len(ids), 500):
            chunk = ids[s:s + 500]
            q = f"SELECT id, label FROM docs WHERE id IN ({','.join('?' * len(chunk))})"
            old.update(dict(self._db.execute(q, chunk).fetchall()))
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        # Capacity: every slot ever filled counts (deleted vectors keep theirs until a compaction).
        in_graph = self._hnsw.get_current_count()
        need = in_graph + len(ids)
        cap = self._hnsw.get_max_elements()
        old_labels = {int(lab) for lab in old.values()}
        compacted = False
        if need > cap:
            dead = in_graph - len(self) + len(old_labels)
            if 2 * dead >= in_graph:
                self._rebuild(exclude=old_labels, extra=len(ids))
                compacted = True
            else:
                while cap < need:
                    cap *= 2
                self._hnsw.resize_index(cap)
        if not compacted:
            for lab in old_labels:
                self._hnsw.mark_deleted(lab)
        self._hnsw.add_items(vecs, labels, num_threads=self.num_threads)
        self._next_label += len(ids)

        with self._db:
            if docs is None:
                self._db.executemany("UPDATE docs SET label = ? WHERE id = ?",
                                     [(int(lab), i) for i, lab in zip(ids, labels) if i in old])
                self._db.executemany("INSERT INTO docs (id, label, title, text, metadata) VALUES (?, ?, '', '', '{}')",
                                     [(i, int(lab)) for i, lab in zip(ids, labels) if i not in old])
            else:
                self._db.executemany("INSERT OR REPLACE INTO docs (id, label, title, text, metadata) "
                                     "VALUES (?, ?, ?, ?, ?)",
                                     [(i, int(lab), *r) for i, lab, r in zip(ids, labels, rows)])

    def _rebuild(self, exclude: set = frozenset(), extra: int = 0) -> None:
        """A fresh graph holding only the live vectors (same labels), with room for `extra` more."""
        labs = [r[0] for r in self._db.execute("SELECT label FROM docs ORDER BY label") if r[0] not in exclude]
        cap = max(1024, 2 * (len(labs) + extra))
        new = _hnswlib().Index(space=self.space, dim=self.dim)
        new.init_index(max_elements=cap, M=self.M, ef_construction=self.ef_construction, random_seed=100)
        new.set_ef(self.ef)
        for s in range(0, len(labs), 8192):
            chunk = np.asarray(labs[s:s + 8192], dtype=np.int64)
            new.add_items(np.asarray(self._hnsw.get_items(chunk), dtype=np.float32), chunk,
                          num_threads=self.num_threads)
        self._hnsw = new

    def compact(self) -> None:
        """Drop deleted vectors from the graph (a rebuild from the live vectors; search results may shift
        slightly, as after any rebuild of an approximate index)."""
        self._rebuild()

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Delete docs by id; ids not in the index are ignored.  Returns how many were deleted."""
        ids = self._check_ids(doc_ids)
        n = 0
        with self._db:
            for i in dict.fromkeys(ids):
                row = self._db.execute("SELECT label FROM docs WHERE id = ?", (i,)).fetchone()
                if row is None:
                    continue
                self._hnsw.mark_deleted(int(row[0]))
                self._db.execute("DELETE FROM docs WHERE id = ?", (i,))
                n += 1
        return n

    # ------------------------------------------------------------------ search

    def _scores(self, dist: np.ndarray) -> np.ndarray:
        return -dist if self.space == "l2" else 1.0 - dist

    def search(self, vectors: Any, k: int = 10, embedder: Any = None) -> list[list[tuple[str, float]]]:
        """Per query row, up to k (doc_id, score) best first (fewer when the index holds fewer docs)."""
        self.check_embedder(embedder)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = _to_matrix(vectors, self.dim)
        live = len(self)
        kk = min(int(k), live)
        if kk == 0 or q.shape[0] == 0:
            return [[] for _ in range(q.shape[0])]
        try:
            labels, dist = self._hnsw.knn_query(q, k=kk, num_threads=self.num_threads)
            results = [(labels[r], dist[r]) for r in range(q.shape[0])]
        except RuntimeError:  # hnswlib found < kk live neighbours for some row (heavily deleted graph)
            results = [self._search_one(q[r], kk) for r in range(q.shape[0])]
        by_label = self._labels_to_ids({int(x) for lab, _ in results for x in lab})
        out = []
        for lab, d in results:
            sc = self._scores(np.asarray(d, dtype=np.float64))
            out.append([(by_label[int(x)], float(s)) for x, s in zip(lab, sc) if int(x) in by_label])
        return out

    def _search_one(self, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        old_ef = self.ef
        try:
            self._hnsw.set_ef(max(old_ef, 4 * k, min(len(self), 4096)))
            return tuple(a[0] for a in self._hnsw.knn_query(v[None], k=k, num_threads=1))
        except RuntimeError:
            pass
        finally:
            self._hnsw.set_ef(old_ef)
        # Exact fallback over the live vectors.
        labs = np.array([r[0] for r in self._db.execute("SELECT label FROM docs")], dtype=np.int64)
        X = np.asarray(self._hnsw.get_items(labs), dtype=np.float32)
        if self.space == "l2":
            d = ((X - v) ** 2).sum(1)
        elif self.space == "cosine":
            d = 1.0 - X @ (v / np.linalg.norm(v))
        else:
            d = 1.0 - X @ v
        order = np.argsort(d, kind="stable")[:k]
        return labs[order], d[order]

    def _labels_to_ids(self, labels: set[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        labels = list(labels)
        for s in range(0, len(labels), 500):
            chunk = labels[s:s + 500]
            q = f"SELECT label, id FROM docs WHERE label IN ({','.join('?' * len(chunk))})"
            out.update(dict(self._db.execute(q, chunk).fetchall()))
        return out

    # ------------------------------------------------------------------ persistence

    def _manifest(self) -> dict:
        return {"version": FORMAT_VERSION, "dim": self.dim, "space": self.space, "M": self.M,
                "ef_construction": self.ef_construction, "ef": self.ef, "count": len(self),
                "next_label": self._next_label, "capacity": self.capacity, "embedder": self.embedder,
                "generation": self.generation, "saved_at": time.time()}

    def save(self, path: str, on_stage: Optional[Callable[[str, str], None]] = None) -> None:
        """Atomically replace directory `path` with this index (see the module docstring's protocol).

        on_stage(stage, dir) is called after each step: "tmp_created", "index_written",
        "docs_written", "committed", "old_moved_aside", "new_in_place" (fault-injection
        tests stop or fail a save there)."""
        hook = on_stage or (lambda stage, where: None)
        path = os.path.abspath(os.fspath(path))
        parent, name = os.path.split(path)
        if not name:
            raise ValueError(f"path: {path!r} has no directory name")
        os.makedirs(parent, exist_ok=True)
        _recover(path)  # a crash between renames left no `path`: put the newest complete copy back first
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"path: {path} exists and is not a directory")
        for stale in _siblings(path, "tmp") + _siblings(path, "old"):
            shutil.rmtree(stale, ignore_errors=True)
        prev_gen = self.generation
        if os.path.isdir(path):
            try:
                prev_gen = max(prev_gen, int(_read_manifest(path).get("generation", 0)))
            except ValueError:
                pass
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        os.mkdir(tmp)
        try:
            hook("tmp_created", tmp)
            ip, dp = os.path.join(tmp, INDEX_FILE), os.path.join(tmp, DOCS_FILE)
            self._hnsw.save_index(ip)
            _fsync_file(ip)
            hook("index_written", tmp)
            self._db.commit()
            dst = sqlite3.connect(dp)
            try:
                self._db.backup(dst)
            finally:
                dst.close()
            _fsync_file(dp)
            hook("docs_written", tmp)
            m = self._manifest()
            m["generation"] = prev_gen + 1
            m["files"] = {n: {"size": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256_file(os.path.join(tmp, n))}
                          for n in (INDEX_FILE, DOCS_FILE)}
            mp = os.path.join(tmp, MANIFEST_FILE)
            with open(mp, "w", encoding="utf-8") as f:
                json.dump(m, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            hook("committed", tmp)  # the temp dir is complete; `path` still holds the previous version
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(path, old)
            hook("old_moved_aside", old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        hook("new_in_place", path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.generation = m["generation"]

    @classmethod
    def load(cls, path: str, embedder: Any = None, verify: bool = True, num_threads: int = -1,
             allow_mismatch: bool = False) -> "HNSWIndex":
        """Load a saved index.  `embedder` (if given) must match the saved one (allow_mismatch:
        logged instead); the files' sha256 are checked against the manifest unless verify=False
        (for huge indexes: sizes are still checked)."""
        path = os.path.abspath(os.fspath(path))
        _recover(path)
        if not os.path.isdir(path):
            raise ValueError(f"index directory {path} does not exist")
        m = _read_manifest(path)
        ip, dp = os.path.join(path, INDEX_FILE), os.path.join(path, DOCS_FILE)
        if verify:
            for n, fp in ((INDEX_FILE, ip), (DOCS_FILE, dp)):
                if sha256_file(fp) != m["files"][n].get("sha256"):
                    raise ValueError(f"corrupt index directory: {fp} does not match its sha256 in the manifest")
        self = cls.__new__(cls)
        self.dim, self.space, self.M = m["dim"], m["space"], m["M"]
        self.ef_construction, self.ef = m["ef_construction"], m["ef"]
        self.embedder = _canon(m.get("embedder"))
        self.num_threads = num_threads
        self.generation = int(m.get("generation", 0))
        self._db = None
        self.check_embedder(embedder, allow_mismatch)
        self._hnsw = _hnswlib().Index(space=self.space, dim=self.dim)
        try:
            self._hnsw.load_index(ip, max_elements=max(int(m.get("capacity", 0)), 1))
        except (RuntimeError, ValueError, MemoryError) as e:
            raise ValueError(f"corrupt index file {ip}: {e}") from None
        self._hnsw.set_ef(self.ef)
        self._open_db(dp)
        try:
            rows = self._db.execute("SELECT label FROM docs").fetchall()
        except sqlite3.DatabaseError as e:
            self.close()
            raise ValueError(f"corrupt index doc store {dp}: {e}") from None
        in_graph = set(int(x) for x in self._hnsw.get_ids_list())
        if len(rows) != m["count"] or any(r[0] not in in_graph for r in rows):
            self.close()
            raise ValueError(f"corrupt index directory {path}: {dp} and {ip} disagree "
                             f"({len(rows)} docs, manifest count {m['count']})")
        self._next_label = max([int(m["next_label"])] + [x + 1 for x in in_graph])
        return self
