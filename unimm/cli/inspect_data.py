"""Show N training samples token by token with their supervision and image slots (`unimm.data.inspect`).

    unimm-inspect-data --model runs/pretrain --data llava.json --num_samples 3
"""

from __future__ import annotations

import sys

from unimm.cli.program import ConfigProgram
from unimm.data.inspect import InspectConfig


def inspect(config: InspectConfig) -> list[str]:
    from unimm.data.inspect import inspect_samples

    shown = inspect_samples(config)
    print("\n\n".join(shown))
    sys.stdout.flush()
    return shown


CONFIG_TYPES = (InspectConfig,)
PROGRAM = ConfigProgram("unimm-inspect-data", CONFIG_TYPES, inspect)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
