"""Tiny random HF models and packed batches shared by the model, adapter and generation tests.

Nothing is downloaded: models are built from configs with random weights.
"""
import copy
import json

import torch
import transformers

from bsharedrag_fast.model.adapters import TARGET_MODULES

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


# the generation tests' cases: tied and untied heads, and a window shorter than prompt +
# generation, so the banded mask is exercised with the cache
GENERATION_CASES = {
    "llama": {},
    # untied: a tied random head mostly predicts the input token again (degenerate greedy runs)
    "qwen2": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=8, head_dim=16),
}


def saved_generation_case(arch: str, tmp_path_factory):
    """(transformers model, our Backbone of it saved in a tmp dir) for GENERATION_CASES[arch];
    no EOS, so transformers' generate runs every prompt to its token limit."""
    from bsharedrag_fast import Backbone

    hf = hf_model(arch, embed_scale=3.0, **GENERATION_CASES[arch])
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp(arch)
    hf.save_pretrained(path)
    return hf, Backbone.from_pretrained(path)


def cu_seqlens(lens) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def packed(lens, vocab: int = 128, seed: int = 1):
    """Random token ids for sequences of these lengths, packed, and their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (sum(lens),), generator=g), cu_seqlens(lens)


def spans(cu) -> list:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


LORA_TARGETS = list(TARGET_MODULES)  # every module LoRA may target


def peft_adapter(hf, path, seed: int, **lora_kw):
    """A PeftModel on a copy of hf with random lora_A and lora_B (peft zero-initialises B),
    saved to path; returns it."""
    import peft

    lora_kw.setdefault("target_modules", LORA_TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**lora_kw)).eval()
    randomize_lora(pm, seed)
    pm.save_pretrained(path)
    return pm


def randomize_lora(pm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def write_tokenizer(path) -> None:
    """A byte-level BPE tokenizer (vocab <= 300; <s> prepended, </s> as EOS) trained on a few
    sentences, saved as tokenizer.json + tokenizer_config.json in path."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    t = HFTok(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "shared backbone, retrieval and generation",
              "low rank adapters share one resident model", "query: passage: "] * 20
    t.train_from_iterator(corpus, trainer)
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", t.token_to_id("<s>"))])
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def rag_checkpoint(root, model: str = "model", adapters=(("retrieval", 1, 4), ("generation", 2, 8)),
                   positions: int = SMALL["max_position_embeddings"]):
    """A tiny qwen2 checkpoint with the test tokenizer in root/model and random PEFT adapters
    (name, seed, rank; alpha 8) in root/name, as the RAG, CLI, eval and server tests use."""
    hf = hf_model("qwen2", embed_scale=3.0, vocab_size=320, tie_word_embeddings=False,
                  max_position_embeddings=positions)
    hf.save_pretrained(root / model)
    write_tokenizer(root / model)
    for name, seed, r in adapters:
        peft_adapter(hf, root / name, seed, r=r, lora_alpha=8)
    return hf
