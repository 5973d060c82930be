"""Show N training samples token by token with their supervision and image slots (see unimm.data.inspect)."""

from unimm.cli import run_main
from unimm.data.inspect import main

if __name__ == "__main__":
    run_main(main)
