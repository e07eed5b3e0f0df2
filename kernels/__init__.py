"""Triton kernels of bsharedrag_fast (installed as bsharedrag_fast.kernels).

Only @triton.jit code and thin launch wrappers live here; autograd, dispatch and
argument validation live in bsharedrag_fast.ops. Importing this package requires triton.
"""
from .attention import attention_config, paged_attention
from .lora_expand import expand_config, lora_expand
from .lora_shrink import lora_shrink, shrink_config
from .pool import pool_backward, pool_forward

__all__ = ["paged_attention", "attention_config", "lora_shrink", "lora_expand", "shrink_config", "expand_config",
           "pool_forward", "pool_backward"]
