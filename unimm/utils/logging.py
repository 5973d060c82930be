"""Rank-aware logging helpers. The library never configures handlers; programs call `setup_logging`."""

from __future__ import annotations

import logging
import os

from unimm.utils.distributed import get_rank

_warned: set[str] = set()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger for a program: INFO on rank 0, WARNING on other ranks."""
    rank = get_rank()
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log `message` as a warning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def info_rank0(logger: logging.Logger, message: str, *args) -> None:
    if get_rank() == 0:
        logger.info(message, *args)
