"""Product features built on the serving engine's decoder: beam search, candidate scoring and the reranker,
and the tasks that run them as jobs beside the running batch (`tasks.SIDE_TASKS`)."""
