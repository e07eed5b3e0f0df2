"""Retrieval-augmented generation over one backbone: prompts, the pipeline, corpus readers."""
