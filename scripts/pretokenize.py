"""`unimm-pretokenize` (unimm.cli.pretokenize); kept so that `python scripts/pretokenize.py` and the launchers keep working."""
from unimm.cli.pretokenize import main

if __name__ == "__main__":
    main()
