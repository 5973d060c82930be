"""The entry-point toy (tiny tokenizer, code caches, tiny Qwen2) and the untrained tiny UniMM model saved from it."""

from tests.entry.conftest import tiny_unimm, toy  # noqa: F401 - fixtures shared with tests/entry
