"""A progress bar: tqdm when it is installed (it is not a dependency), else a plain stderr line."""
from __future__ import annotations

import sys
import time


class _Line:
    """`label: done/total` rewritten in place (at most 4 times a second), ended by close()."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.shown = total, desc, 0, 0.0
        self._show()

    def _show(self):
        sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total}")
        sys.stderr.flush()
        self.shown = time.monotonic()

    def update(self, n: int = 1):
        self.done += n
        if self.done >= self.total or time.monotonic() - self.shown > 0.25:
            self._show()

    def close(self):
        self._show()
        sys.stderr.write("\n")


class _Silent:
    def update(self, n: int = 1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, disable: bool = False):
    if disable:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Line(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True)
