"""The engine: the paged KV cache, one step's context (step.py), sampling, and the continuous-batching
scheduler (runtime.SharedRuntime)."""
