"""The loading progress bar `archkit` commands show on stderr (core.load(progress=ProgressBar()))."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """load(progress=...) callback drawing a loading bar on stderr: percent, bytes, file k/n, rate.

    Checkpoints under `min_bytes` load too fast to need one. On a terminal the bar redraws in place;
    otherwise (logs, CI) it prints a plain line at 0% and at each further 10%.
    """

    def __init__(self, stream=None, min_bytes: int = 64 << 20, width: int = 28):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_bytes, self.width = min_bytes, width
        self.t0, self.last, self.tenth, self.shown = time.monotonic(), -1.0, -1, 0

    def __call__(self, done: int, total: int, file_no: int, files: int) -> None:
        if total < self.min_bytes:
            return
        now, frac = time.monotonic(), done / total if total else 1.0
        if self.tty:
            if done < total and now - self.last < 0.1:
                return
            self.last = now
            fill = int(frac * self.width)
            line = f"loading {frac:4.0%} |{'#' * fill}{'.' * (self.width - fill)}| " + self._numbers(done, total, file_no, files, now)
            self.stream.write("\r" + line.ljust(self.shown) + ("\n" if done >= total else ""))  # pad over a longer last line
            self.stream.flush()
            self.shown = len(line)
        elif int(frac * 10) > self.tenth:
            self.tenth = int(frac * 10)
            print(f"loading {self.tenth * 10:3d}% " + self._numbers(done, total, file_no, files, now), file=self.stream,
                  flush=True)

    def _numbers(self, done, total, file_no, files, now) -> str:
        rate = done / max(now - self.t0, 1e-9)
        shard = f", file {file_no}/{files}" if files > 1 else ""
        return f"{_bytes(done)} / {_bytes(total)}{shard}, {_bytes(rate)}/s"


def _bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units, like the file sizes `inspect` prints)."""
    if n < 1000:
        return f"{n:.0f} B"
    unit = next((u for u, k in (("GB", 1e9), ("MB", 1e6)) if n >= k), "KB")
    return f"{n / {'GB': 1e9, 'MB': 1e6, 'KB': 1e3}[unit]:.1f} {unit}"
