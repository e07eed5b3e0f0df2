"""The vector index: HNSW (hnswlib) over the embeddings, documents in SQLite."""
