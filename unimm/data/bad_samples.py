"""Counting bad input: unreadable images and malformed records are skipped and remembered by id, up to a
configurable fraction of everything seen; past that fraction the run stops with an error that says how many,
which, and why, instead of silently training on a shrinking or empty dataset."""

from __future__ import annotations

import logging

from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)


class TooManyBadSamplesError(UserError, RuntimeError):
    """Raised when the fraction of skipped samples exceeds `max_bad_fraction`."""


class BadSampleTracker:
    """Counts good and bad samples; `record_bad` raises `TooManyBadSamplesError` once the bad fraction is over
    `max_bad_fraction` (checked only after `min_seen` samples, so one early bad sample does not stop a run,
    and always by `check(final=True)` at the end of a pass).

    `max_bad_fraction=0.0` tolerates no bad sample at all.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_seen: int = 100, name: str = "data",
                 max_examples: int = 20):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_seen < 0:
            raise ValueError(f"min_seen must be >= 0, got {min_seen}")
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.name = name
        self.max_examples = max_examples
        self.num_ok = 0
        self.num_bad = 0
        self.bad_examples: list[tuple[str, str]] = []  # first `max_examples` (sample id, reason)

    @property
    def num_seen(self) -> int:
        return self.num_ok + self.num_bad

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_seen if self.num_seen else 0.0

    def record_ok(self, n: int = 1) -> None:
        self.num_ok += n
        self.check()

    def record_bad(self, sample_id: str, reason: str) -> None:
        self.num_bad += 1
        if len(self.bad_examples) < self.max_examples:
            self.bad_examples.append((str(sample_id), str(reason)))
        logger.warning("%s: skipping sample %s: %s", self.name, sample_id, reason)
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise if too many samples were bad. `final=True` ignores `min_seen` (end of a pass over the data)."""
        if self.num_bad == 0:
            return
        if self.max_bad_fraction == 0.0 or (
            (final or self.num_seen >= self.min_seen) and self.bad_fraction > self.max_bad_fraction
        ):
            raise TooManyBadSamplesError(self._message())

    def _message(self) -> str:
        shown = "; ".join(f"{sid}: {reason}" for sid, reason in self.bad_examples[:5])
        more = "" if self.num_bad <= 5 else f" (and {self.num_bad - 5} more)"
        return (
            f"{self.name}: {self.num_bad} of {self.num_seen} samples were bad "
            f"(fraction {self.bad_fraction:.4f} > max_bad_fraction {self.max_bad_fraction}); "
            f"first bad samples: {shown}{more}. Fix or remove these records, or raise max_bad_fraction."
        )

    def summary(self) -> dict:
        return {
            "name": self.name,
            "num_seen": self.num_seen,
            "num_ok": self.num_ok,
            "num_bad": self.num_bad,
            "bad_fraction": self.bad_fraction,
            "max_bad_fraction": self.max_bad_fraction,
            "bad_examples": [list(example) for example in self.bad_examples],
        }
