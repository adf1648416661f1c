"""Product features built on the serving engine: beam search and candidate scoring (groups of rows of the running
batch, `workers/engine/groups.py`), the reranker, and the jobs that run them (`group_jobs.GROUP_JOBS`)."""
