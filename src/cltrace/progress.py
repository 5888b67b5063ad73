"""Progress bars with a rate and an ETA for everything slow."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False, disable: bool | None = None, **kw):
    """A tqdm bar on stderr showing rate and ETA; hidden when stderr is not a terminal and
    CLTRACE_PROGRESS is unset, unless `disable=False` is given."""
    from tqdm.auto import tqdm
    import os

    if disable is None:
        disable = not (sys.stderr.isatty() or os.environ.get("CLTRACE_PROGRESS"))
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=disable, dynamic_ncols=True, smoothing=0.1, **kw)
