"""The decoder's linear modules that take LoRA, and the HF sub-module each sits in: the one
list the model, training, synthetic checkpoints and PEFT parsing read (torch-free, so that
the command line builds its options without torch)."""

# The decoder's linear modules that take LoRA (the one list: model, training, synthetic
# checkpoints and PEFT parsing all read it) and the HF sub-module each sits in.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
