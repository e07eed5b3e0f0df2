"""Tiny random HF models and packed batches shared by the model, adapter and generation tests.

Nothing is downloaded: models are built from configs with random weights.
"""
import torch
import transformers

SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def hf_model(arch: str, embed_scale: float = 1.0, **overrides):
    """A seeded fp32 model of SMALL size; norms and biases get random offsets so a mix-up of
    them shows up, and embed_scale > 1 spreads the logits (fewer near-ties in greedy runs)."""
    cls_cfg, cls_model = ARCHS[arch]
    torch.manual_seed(0)
    cfg = cls_cfg(**dict(SMALL, **overrides))
    cfg.architectures = [cls_model.__name__]
    model = cls_model(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.model.embed_tokens.weight.mul_(embed_scale)
    return model


def cu_seqlens(lens) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def packed(lens, vocab: int = 128, seed: int = 1):
    """Random token ids for sequences of these lengths, packed, and their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (sum(lens),), generator=g), cu_seqlens(lens)


def spans(cu) -> list:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))
