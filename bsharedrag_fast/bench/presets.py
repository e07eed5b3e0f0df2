"""Model shapes of public models (no weights) that `bsharedrag bench --preset`, the
benchmarks and bench.synthetic's random checkpoints use, and the setups its workers run.
Torch-free, so that the command line's --help does not import torch."""

# the config fields every Qwen2 / Llama shape shares
QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6,
             use_sliding_window=False)
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=5e5, rms_norm_eps=1e-5)
PRESETS = {
    "tiny": dict(QWEN2, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "qwen2-0.5b": dict(QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}

# The setups a bench worker runs (bench/worker.py).
SETUPS = ("shared", "separate", "hf_peft")
