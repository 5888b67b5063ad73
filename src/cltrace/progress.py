"""Progress for everything slow, with a rate and an ETA.

On a terminal: a tqdm bar on stderr. With stderr redirected (a log file, nohup, a scheduler):
a plain line every LOG_EVERY_S seconds, `harvest: 120k/1.00M tok (12%), 3.2k tok/s, ETA 04:35`,
and one at the end, so a long command is never silent for minutes.

CLTRACE_PROGRESS: unset or empty = as above; "0" = nothing; anything else = always a bar.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

LOG_EVERY_S = 30.0


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    disable: bool | None = None,
    **kw,
):
    """A progress reporter with tqdm's interface (iterate, `update`, `set_postfix`, `close`).

    `disable=None` chooses by where stderr goes (see the module docstring); `disable=True`
    shows nothing; `disable=False` always shows a bar.
    """
    from tqdm.auto import tqdm

    setting = os.environ.get("CLTRACE_PROGRESS", "")
    if disable is None and setting == "0":
        disable = True
    elif disable is None and not setting and not sys.stderr.isatty():
        return LogProgress(
            iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=kw.get("initial", 0)
        )
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=bool(disable),
        dynamic_ncols=True,
        smoothing=0.1,
        **kw,
    )


class LogProgress:
    """tqdm's interface, writing a plain line every `every` seconds (and a last one on close
    when it wrote any): done/total, percent, rate over the whole run, ETA, postfix."""

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        initial: float = 0,
        every: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        file: TextIO | None = None,
    ):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.unit, self.unit_scale, self.every = unit, unit_scale, every
        self.n = self.initial = initial
        self.clock, self.file = clock, file
        self.t0 = self.last = clock()
        self.postfix = ""
        self.lines = 0
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is not None:
            return int(self.total)
        if isinstance(self.iterable, Sized):
            return len(self.iterable)
        raise TypeError("LogProgress has no total and its iterable has no len()")  # as len() would

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._write(self.line(now))

    def set_postfix(
        self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any
    ) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kw}.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lines:
            self._write(self.line(self.clock(), done=True))

    def line(self, now: float, done: bool = False) -> str:
        """`desc: done/total unit (pct), rate unit/s, ETA mm:ss[, postfix]`."""
        from tqdm import tqdm

        elapsed = max(now - self.t0, 1e-9)
        rate = (self.n - self.initial) / elapsed
        parts = [f"{self._num(self.n)}{'/' + self._num(self.total) if self.total else ''} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{self._num(rate)} {self.unit}/s")
        if done:
            parts.append(f"done in {tqdm.format_interval(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {tqdm.format_interval(max(self.total - self.n, 0) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc.strip() or 'progress'}: " + ", ".join(parts)

    def _num(self, x: float) -> str:
        from tqdm import tqdm

        if self.unit_scale:
            return tqdm.format_sizeof(x)
        return f"{x:,.0f}" if x >= 10 or x == int(x) else f"{x:.2g}"

    def _write(self, text: str) -> None:
        print(text, file=self.file or sys.stderr, flush=True)
        self.lines += 1
