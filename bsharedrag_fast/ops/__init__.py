"""Fused ops: multi-LoRA linear, the dense base linear, pooled embedding, causal attention over the
paged KV cache, and the row-wise ops between a layer's matmuls (RMSNorm with its residual add,
rotary embedding, SiLU-and-mul), and a whole decoder stack in one call (DecoderStack).

Each op has a pure-torch reference beside its fast backends ("triton", "cpp");
tests compare the fast paths against the reference.
"""
from ._backends import triton_available
from .attention import packed_tables, paged_attention, paged_attention_reference
from .decoder import DecoderShape, DecoderStack, LayerScales, LayerWeights, decoder_layers_reference
from .linear import dequantize_int8, linear, quantize_int8
from .lora_linear import LoRASlice, MergedLoRA, add_lora_, add_lora_slices_, lora_linear, lora_linear_reference
from .lora_meta import LoRAMeta
from .pool import pool, pool_reference
from .rms_norm import add_rms_norm, rms_norm, rms_norm_reference
from .rope import rope, rope_cos_sin, rope_reference
from .silu_mul import silu_mul, silu_mul_reference

__all__ = ["DecoderShape", "DecoderStack", "LayerScales", "LayerWeights", "LoRAMeta", "LoRASlice", "MergedLoRA",
           "add_lora_", "add_lora_slices_", "add_rms_norm", "decoder_layers_reference", "dequantize_int8", "linear",
           "lora_linear", "lora_linear_reference", "packed_tables", "paged_attention", "paged_attention_reference",
           "pool", "pool_reference", "quantize_int8", "rms_norm", "rms_norm_reference", "rope", "rope_cos_sin",
           "rope_reference", "silu_mul", "silu_mul_reference", "triton_available"]
