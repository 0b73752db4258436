"""The progress display that long loops share (train(), APD/SPD training, harvest()).

On a terminal a tqdm bar; elsewhere (a log file, CI) plain lines on stderr that
never use '\\r', so a log reads line by line. Each caller says when to show a
status and what it says; this class draws it the same way for all of them.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """``total`` units of ``unit`` (None: unknown); ``enabled=False``: silent."""

    # A status costs the caller a device sync (.item()), so even the bar is refreshed
    # only this often; a log gets a line at most every PLAIN_LINE_SECONDS.
    TERMINAL_STATUS_SECONDS = 1.0
    PLAIN_LINE_SECONDS = 10.0

    def __init__(self, total: int | None, unit: str, enabled: bool = True) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.started = self.last_shown = time.perf_counter()
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, units: int = 1) -> None:
        self.done += units
        if self.bar is not None:
            self.bar.update(units)

    def due(self) -> bool:
        """Whether the clock says a status is due: TERMINAL_STATUS_SECONDS after the
        last on a terminal, PLAIN_LINE_SECONDS in a log."""
        interval = self.TERMINAL_STATUS_SECONDS if self.bar is not None else self.PLAIN_LINE_SECONDS
        return self.enabled and time.perf_counter() - self.last_shown >= interval

    def show(self, head: str, status: str) -> None:
        """``status`` beside the bar; in a log the line ``head  status  elapsed ..``
        and, once the total and some progress are known, ``left ..``."""
        if not self.enabled:
            return
        self.last_shown = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            return
        elapsed = self.last_shown - self.started
        line = f"{head}  {status}  elapsed {tqdm.format_interval(elapsed)}"
        if self.total and self.done:
            line += f"  left {tqdm.format_interval(elapsed / self.done * (self.total - self.done))}"
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
