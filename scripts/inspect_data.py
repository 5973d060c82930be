"""`unimm-inspect-data` (unimm.cli.inspect_data); kept so that `python scripts/inspect_data.py` and the launchers keep working."""
from unimm.cli.inspect_data import main

if __name__ == "__main__":
    main()
