"""unimm.llm."""
