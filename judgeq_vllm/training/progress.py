"""A progress bar: tqdm on a terminal, plain log lines elsewhere.

Plain lines (about 20 per run) where stderr is not a terminal, such as a remote job's
captured log, which tqdm's redraws would flood, or where tqdm is not installed (the GPU
host may lack it; training must not depend on it).
"""

from __future__ import annotations

import sys
import time

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # only where tqdm is absent
    _tqdm = None


class _LineProgress:
    """The part of tqdm's interface used here, printing about 20 lines per run."""

    def __init__(self, total: int, desc: str, initial: int, enabled: bool):
        self.total, self.desc, self.n, self.enabled = total, desc, initial, enabled
        self.every = max(1, total // 20)
        self.postfix = ""
        self.start = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and (self.n % self.every == 0 or self.n == self.total):
            elapsed = time.monotonic() - self.start
            print(f"{self.desc}: {self.n}/{self.total} ({elapsed:.0f}s) {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True):
    """A progress bar over ``total`` items (``update``, ``set_postfix_str``, ``close``)."""
    if _tqdm is not None and sys.stderr.isatty():
        return _tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True)
    return _LineProgress(total, desc, initial, enabled)
