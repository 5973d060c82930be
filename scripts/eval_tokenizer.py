#!/usr/bin/env python
"""Evaluate a visual tokenizer: `unimm.cli.eval_tokenizer` (also the `unimm-eval-tokenizer` command)."""
from unimm.cli.eval_tokenizer import main

if __name__ == "__main__":
    main()
