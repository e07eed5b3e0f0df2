"""Tiny random GGUF files (Llama / Qwen2, or any architecture name for the error tests) written
with the gguf package, for the import tests: every tensor can get its own quantization type,
and the tokenizer is the test BPE (tiny_models.write_tokenizer) stored as a llama.cpp "gpt2"
vocabulary.

gguf.quants.quantize covers F16, BF16, Q8_0, Q4_0, Q4_1; it cannot quantize K-quants, so
Q4_K / Q6_K tensors are random blocks with small fp16 scales (a dequantizer cannot tell).
Q8_1 blocks are plain random bytes: gguf cannot dequantize Q8_1 either, which is what the
unsupported-type tests need.
"""
import json

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SHAPE = dict(vocab=320, d=256, ffn=512, layers=2, heads=4, kv_heads=2)  # K-quant rows need multiples of 256


def _random_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block, 1), 0.002, dtype=np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    elif qtype == gguf.GGMLQuantizationType.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        raw[..., -2:] = scale
    elif qtype != gguf.GGMLQuantizationType.Q8_1:
        raise ValueError(f"no random-block writer for {qtype.name}")
    return raw.reshape(rows, -1)


def _tensor(rng, shape, qtype_name: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: floats quantized as asked."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype_name]
    x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if qt == gguf.GGMLQuantizationType.F32:
        return x, None
    if qt in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q8_1):
        return _random_blocks(rng, shape[0], shape[1], qt), qt
    return gguf.quants.quantize(x, qt), qt


def write_gguf(path, tok_dir, arch: str = "llama", types=None, name: str = "tiny test model",
               tied: bool = True, chat_template: str = CHATML, eot_token: str | None = None, seed: int = 0) -> str:
    """A random model of SHAPE at path; types maps a GGUF tensor-name suffix (attn_q, ffn_down,
    token_embd, ...) to a quantization type name (default F32). Norms stay F32 (as llama.cpp).
    eot_token: a token (e.g. "<unused0>", the vocabulary's padding) the header names as
    end-of-turn, a second stop id."""
    import gguf

    types = types or {}
    rng = np.random.default_rng(seed)
    s = SHAPE
    head_dim = s["d"] // s["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(s["layers"])
    w.add_context_length(256)
    w.add_embedding_length(s["d"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    with open(f"{tok_dir}/tokenizer.json", encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert len(tokens) <= s["vocab"]
    tokens += [f"<unused{i}>" for i in range(s["vocab"] - len(tokens))]
    specials = {"<unk>", "<s>", "</s>", eot_token}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    if eot_token:
        w.add_eot_token_id(tokens.index(eot_token))
    if chat_template:
        w.add_chat_template(chat_template)

    def add(tname: str, shape, kind: str, norm: bool = False):
        if norm:
            w.add_tensor(tname, (1.0 + rng.standard_normal(shape) * 0.1).astype(np.float32))
            return
        data, raw = _tensor(rng, shape, types.get(kind, "F32"))
        w.add_tensor(tname, data, raw_dtype=raw)

    q, kv = s["heads"] * head_dim, s["kv_heads"] * head_dim
    add("token_embd.weight", (s["vocab"], s["d"]), "token_embd")
    for i in range(s["layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (s["d"],), "", norm=True)
        add(p + "attn_q.weight", (q, s["d"]), "attn_q")
        add(p + "attn_k.weight", (kv, s["d"]), "attn_k")
        add(p + "attn_v.weight", (kv, s["d"]), "attn_v")
        if arch == "qwen2":
            for b, n in (("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)):
                w.add_tensor(p + b, (rng.standard_normal(n) * 0.1).astype(np.float32))
        add(p + "attn_output.weight", (s["d"], q), "attn_output")
        add(p + "ffn_norm.weight", (s["d"],), "", norm=True)
        add(p + "ffn_gate.weight", (s["ffn"], s["d"]), "ffn_gate")
        add(p + "ffn_up.weight", (s["ffn"], s["d"]), "ffn_up")
        add(p + "ffn_down.weight", (s["d"], s["ffn"]), "ffn_down")
    add("output_norm.weight", (s["d"],), "", norm=True)
    if not tied:
        add("output.weight", (s["vocab"], s["d"]), "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
