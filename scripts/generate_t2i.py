"""`unimm-generate-t2i` (unimm.cli.generate_t2i); kept so that `python scripts/generate_t2i.py` and the launchers keep working."""
from unimm.cli.generate_t2i import main

if __name__ == "__main__":
    main()
