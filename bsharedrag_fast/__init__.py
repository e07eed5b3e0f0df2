"""bsharedrag_fast: one resident LLM backbone shared by retrieval and generation LoRAs.

The public names load on first use (PEP 562), so `import bsharedrag_fast` and the command
line's `--help` do not pay for torch: `from bsharedrag_fast import Backbone` imports it then.
"""
import importlib
import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning unless the user
# chose otherwise (on a loaded machine spinning made training 2-10x slower; see threads.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Answer": "rag.pipeline", "Backbone": "model.backbone", "CacheFullError": "engine.kv_cache",
    "GenerationResult": "engine.generation", "HNSWIndex": "index.hnsw", "KVCache": "engine.kv_cache",
    "ModelConfig": "model.backbone", "RAGPipeline": "rag.pipeline", "SharedRuntime": "engine.runtime",
    "Tokenizer": "model.tokenizer", "generate": "engine.runtime", "ops": "ops",
}  # fmt: skip
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch  # noqa: F401  first: its bundled libgomp.so.1 is then the one our _C shares

    mod = importlib.import_module(f".{module}", __name__)
    value = mod if name == "ops" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))
