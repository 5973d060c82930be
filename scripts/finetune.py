"""`unimm-finetune` (unimm.cli.finetune); kept so that `python scripts/finetune.py` and the launchers keep working."""
from unimm.cli.finetune import main

if __name__ == "__main__":
    main()
