"""Item progress lines with throughput and ETA for every long step (F31 in docs/architecture.md).

Dagster-free on purpose: library functions take ``log_fn`` (the Dagster assets pass
``context.log.info``, so lines land in the run log); by default lines go to the stdlib
``seg_pipeline`` logger, so library and CLI users see them once logging is configured.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

LOGGER_NAME = "seg_pipeline"

LogFn = Callable[[str], None]


def format_duration(seconds: float) -> str:
    """``62 -> '1m02s'``, ``3725 -> '1h02m05s'``, ``9.5 -> '9s'``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def default_log_fn(logger_name: str = LOGGER_NAME) -> LogFn:
    """``logging.getLogger(logger_name).info``: reaches the terminal when logging is configured."""
    return logging.getLogger(logger_name).info


class ItemProgress:
    """Counts items of one long step and logs ``label: n/N unit (p%) | r unit/s | elapsed .. | eta ..``.

    A line is due every ``every_n`` items, or when ``min_interval_s`` passed since the last line
    (so slow items still show signs of life), until the last item, which :meth:`done` reports with
    the closing ``label: n/N unit in 9s (13.1 unit/s)`` line; nothing is logged before ``delay_s``
    seconds, so steps that finish quickly stay quiet.

    Args:
        label: What is being processed, e.g. ``"headers demo"``; starts every line.
        total: Items expected; 0 is allowed (nothing to do, no division by zero).
        unit: Plural noun of the items (``"tiles"``, ``"files"``, ``"windows"``).
        log_fn: Sink for the lines (default: the ``seg_pipeline`` logger at INFO).
        every_n: Items between lines; default about 10% of ``total`` (at least 1).
        min_interval_s: A line is also due when this many seconds passed since the last one.
        delay_s: No line at all (closing line included) until this many seconds passed.
        clock: Time source in seconds (injectable for tests).
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "items",
        log_fn: LogFn | None = None,
        every_n: int | None = None,
        min_interval_s: float = 5.0,
        delay_s: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if every_n is not None and every_n < 1:
            raise ValueError(f"every_n={every_n!r} must be >= 1 (or None for about every 10%).")
        self.label = label
        self.total = max(0, int(total))
        self.unit = unit
        self.log_fn = log_fn or default_log_fn()
        self.every_n = every_n if every_n is not None else max(1, math.ceil(self.total / 10))
        self.min_interval_s = float(min_interval_s)
        self.delay_s = float(delay_s)
        self.clock = clock
        self.start_time = clock()
        self.count = 0
        self.lines_logged = 0
        self._last_line_time = self.start_time

    def elapsed(self) -> float:
        """Seconds since the progress was created."""
        return self.clock() - self.start_time

    def rate(self) -> float:
        """Average items per second so far (0 before any time has passed)."""
        elapsed = self.elapsed()
        return self.count / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the average pace so far (None while the pace is unknown)."""
        remaining = max(0, self.total - self.count)
        if remaining == 0:
            return 0.0
        rate = self.rate()
        return remaining / rate if rate > 0 else None

    def _due(self, before: int, now: float) -> bool:
        if now - self.start_time < self.delay_s:
            return False
        if self.count >= self.total:
            return False  # the closing line of done() reports the last item
        if self.count // self.every_n > before // self.every_n:
            return True
        return now - self._last_line_time >= self.min_interval_s

    def advance(self, n: int = 1, detail: str | None = None) -> str | None:
        """Count ``n`` more items; returns (and logs) the line when one is due, else None."""
        before = self.count
        self.count += n
        now = self.clock()
        if not self._due(before, now):
            return None
        line = self.format_line(detail)
        self._emit(line, now)
        return line

    def done(self, detail: str | None = None) -> str:
        """Log (unless within ``delay_s`` and silent so far) and return the closing line."""
        now = self.clock()
        line = self.format_done(detail)
        if self.lines_logged or now - self.start_time >= self.delay_s:
            self._emit(line, now)
        return line

    def _emit(self, line: str, now: float) -> None:
        self.log_fn(line)
        self.lines_logged += 1
        self._last_line_time = now

    def _percent(self) -> int:
        return 100 if self.total == 0 else math.floor(100 * min(self.count, self.total) / self.total)

    def format_line(self, detail: str | None = None) -> str:
        """``label: 40/120 tiles (33%) | 12.3 tiles/s | elapsed 3s | eta 6s`` (`` | detail``)."""
        eta = self.eta()
        line = (
            f"{self.label}: {self.count}/{self.total} {self.unit} ({self._percent()}%) | "
            f"{self.rate():.1f} {self.unit}/s | elapsed {format_duration(self.elapsed())} | "
            f"eta {format_duration(eta) if eta is not None else '?'}"
        )
        return f"{line} | {detail}" if detail else line

    def format_done(self, detail: str | None = None) -> str:
        """``label: 120/120 tiles in 9s (13.1 tiles/s)`` (`` | detail``)."""
        line = (
            f"{self.label}: {self.count}/{self.total} {self.unit} in "
            f"{format_duration(self.elapsed())} ({self.rate():.1f} {self.unit}/s)"
        )
        return f"{line} | {detail}" if detail else line
