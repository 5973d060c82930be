#!/usr/bin/env python
"""Train a visual tokenizer: `unimm.cli.train_tokenizer` (also the `unimm-train-tokenizer` command)."""
from unimm.cli.train_tokenizer import main

if __name__ == "__main__":
    main()
