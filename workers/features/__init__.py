"""Product features built on the serving engine's decoder: beam search, candidate scoring and the reranker."""
