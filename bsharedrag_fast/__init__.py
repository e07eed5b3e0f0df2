"""bsharedrag_fast: one resident LLM backbone shared by retrieval and generation LoRAs."""
import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning unless the user
# chose otherwise (on a loaded machine spinning made training 2-10x slower; see threads.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402,F401  imported first: its bundled libgomp.so.1 is then shared with our _C

from . import ops
from .engine.generation import GenerationResult
from .engine.kv_cache import CacheFullError, KVCache
from .engine.runtime import SharedRuntime, generate
from .index.hnsw import HNSWIndex
from .model.backbone import Backbone, ModelConfig
from .model.tokenizer import Tokenizer
from .rag.pipeline import Answer, RAGPipeline

__version__ = "0.1.0"
__all__ = [
    "Answer", "Backbone", "CacheFullError", "GenerationResult", "HNSWIndex", "KVCache", "ModelConfig",
    "RAGPipeline", "SharedRuntime", "Tokenizer",
    "generate", "ops", "__version__",
]
