"""The model layer: the Backbone (one nn.Module for training and serving), attention, PEFT adapters,
model names and GGUF import, the tokenizer."""
