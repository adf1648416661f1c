"""The job path, from an accepted request to its events: choosing a pool and enqueueing (`routing`), what
the API knows of a job (`state`), waiting for or relaying its events (`pipeline`, `sse`), and batches of
jobs (`batch_store`). Nothing here is a route."""
