"""`unimm-quickstart-eval` (unimm.cli.quickstart_eval); kept so that `python scripts/quickstart_eval.py` and the launchers keep working."""
from unimm.cli.quickstart_eval import main

if __name__ == "__main__":
    main()
