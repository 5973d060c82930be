"""unimm.tokenizer."""
