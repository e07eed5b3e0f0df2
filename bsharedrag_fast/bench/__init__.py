"""`bsharedrag bench`: Shared vs Separate RAG vs transformers+peft, each setup in its own worker
process, on synthetic or real checkpoints."""
