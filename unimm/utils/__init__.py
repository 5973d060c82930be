"""Small shared helpers: optional imports, logging, distributed wrappers, config parsing, attention backend."""
