"""unimm.tokenizer.quantizers."""
