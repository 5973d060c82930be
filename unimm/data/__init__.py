"""unimm.data."""
