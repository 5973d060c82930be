"""unimm.train."""
