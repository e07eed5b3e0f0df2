"""Fused ops: multi-LoRA linear (and, later, pooled embedding).

Each op has a pure-torch reference beside its fast backends ("triton", "cpp");
tests compare the fast paths against the reference.
"""
from .lora_linear import add_lora_, lora_linear, lora_linear_reference
from .lora_meta import LoRAMeta

__all__ = ["LoRAMeta", "add_lora_", "lora_linear", "lora_linear_reference"]
