"""bsharedrag_fast: one resident LLM backbone shared by retrieval and generation LoRAs.

The public names load on first use (PEP 562), so `import bsharedrag_fast` and the command
line's `--help` do not pay for torch: `from bsharedrag_fast import Backbone` imports it then.
"""
import importlib
import sys

# Before torch loads libgomp (it reads the variables once): idle OpenMP threads spin briefly
# when this process's cores are idle, else sleep, unless the user chose (util/threads.py);
# freed tensor memory stays in the heap for the next step, and oneDNN keeps fewer primitives
# (util/malloc.py)
from .util import malloc as _malloc  # the standard library only
from .util import threads as _threads

_malloc.configure()
_malloc.cap_onednn_cache()

if "torch" not in sys.modules:
    _threads.choose_wait_policy()
else:
    _threads.WAIT_POLICY = "torch loaded first"  # libgomp has read the variables already

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
