"""`unimm-pretrain` (unimm.cli.pretrain); kept so that `python scripts/pretrain.py` and the launchers keep working."""
from unimm.cli.pretrain import main

if __name__ == "__main__":
    main()
