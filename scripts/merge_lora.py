"""`unimm-merge-lora` (unimm.cli.merge_lora); kept so that `python scripts/merge_lora.py` and the launchers keep working."""
from unimm.cli.merge_lora import main

if __name__ == "__main__":
    main()
