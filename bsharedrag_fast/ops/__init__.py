"""Fused ops: multi-LoRA linear, the dense base linear, pooled embedding and causal attention over the paged KV cache.

Each op has a pure-torch reference beside its fast backends ("triton", "cpp");
tests compare the fast paths against the reference.
"""
from ._backends import triton_available
from .attention import packed_tables, paged_attention, paged_attention_reference
from .linear import linear
from .lora_linear import LoRASlice, MergedLoRA, add_lora_, add_lora_slices_, lora_linear, lora_linear_reference
from .lora_meta import LoRAMeta
from .pool import pool, pool_reference

__all__ = ["LoRAMeta", "LoRASlice", "MergedLoRA", "add_lora_", "add_lora_slices_", "linear", "lora_linear",
           "lora_linear_reference", "packed_tables", "paged_attention", "paged_attention_reference", "pool",
           "pool_reference", "triton_available"]
