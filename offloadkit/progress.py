"""Progress bars (tqdm) for work that takes seconds or more: calibrating, searching, writing and pinning weights.

Shown only when standard error is a terminal, and never when switched off: the CLI's `--quiet`,
`OFFLOADKIT_PROGRESS=0` in the environment, or `offloadkit.progress.enabled = False` in code.
Small jobs (under `min_total`) show nothing, so tests and quick calls stay silent.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

enabled: bool | None = None  # None: on when standard error is a terminal and OFFLOADKIT_PROGRESS is not 0


def showing() -> bool:
    if enabled is not None:
        return enabled
    if os.environ.get("OFFLOADKIT_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _stream().isatty()


def _stream():
    return sys.stderr


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def bar(description: str, total: int | None = None, *, unit: str = "it", min_total: int = 0):
    """A bar with `update(n)`; a silent stand-in when progress is off or the job is small."""
    if not showing() or (total is not None and total < min_total):
        yield _Silent()
        return
    from tqdm import tqdm

    scale = unit == "B"
    with tqdm(total=total, desc=description, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
              leave=False, file=_stream(), dynamic_ncols=True) as shown:
        yield shown
