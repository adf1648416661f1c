"""The CPU pool: an INT8 decoder and its RQ worker."""
