"""`unimm-chat` (unimm.cli.chat); kept so that `python scripts/chat.py` and the launchers keep working."""
from unimm.cli.chat import main

if __name__ == "__main__":
    main()
