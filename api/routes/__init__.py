"""Routes by what the user does: generate, chat, batches, jobs, tokenizer, health, the demo page."""
