"""What an index records about the embedder of its vectors, by content.

Queries must be embedded as the indexed passages were: same base weights, same retrieval
adapter, same pooling, prefixes and length limit. The fingerprint holds the sha256 of the
base model's weights and config and of the adapter's weights and config (not their
paths: a copied model matches, a different adapter saved under the same name does not),
plus those settings. HNSWIndex.check_embedder compares it on every load and every search
or upsert that passes one, and names the parts that differ.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

_memo: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: each file is hashed once per process


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's content (read in chunks): GGUF sources, converted models,
    index files and the fingerprints below all use this one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _memo:
        _memo[key] = sha256_file(path)
    return _memo[key]


def files_sha256(directory: str, names: list[str]) -> str:
    """One sha256 over the named files of a directory (names and contents, in sorted order)."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + _file_sha256(os.path.join(directory, name)).encode() + b"\0")
    return h.hexdigest()


def model_sha256(model_dir: str) -> str:
    """sha256 of an HF model directory's config.json and *.safetensors weights."""
    names = [n for n in os.listdir(model_dir) if n.endswith(".safetensors") or n == "config.json"]
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{model_dir}: no *.safetensors weights to fingerprint")
    return files_sha256(model_dir, names)


def adapter_sha256(adapter_dir: str) -> str:
    """sha256 of a PEFT adapter's adapter_config.json and adapter_model.safetensors."""
    from .adapters import CONFIG_NAME, WEIGHTS_NAME

    for n in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(adapter_dir, n)):
            raise ValueError(f"{adapter_dir}: no {n} (not a PEFT adapter directory)")
    return files_sha256(adapter_dir, [CONFIG_NAME, WEIGHTS_NAME])


def embedder_fingerprint(model_dir: str, adapter_dir: Optional[str], pooling: str, query_prefix: str,
                         passage_prefix: str, max_length: Optional[int]) -> dict:
    """The record an index keeps of its embedder (see the module docstring)."""
    return {
        "model_sha256": model_sha256(model_dir),
        "adapter_sha256": adapter_sha256(adapter_dir) if adapter_dir else None,
        "pooling": pooling,
        "query_prefix": query_prefix,
        "passage_prefix": passage_prefix,
        "max_length": max_length,
    }
