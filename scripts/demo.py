"""`unimm-demo` (unimm.cli.demo), as `python scripts/demo.py`."""
from unimm.cli.demo import main

if __name__ == "__main__":
    main()
