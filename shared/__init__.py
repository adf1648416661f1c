"""Code both the API and the workers rely on: settings, job schema, names, events, sampling, tokenizer."""
