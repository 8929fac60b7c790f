"""Progress reporting for the CLI: bars for simulation/synthesis, a line per training epoch."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


class Progress:
    """Draws progress on a stream (stderr); `quiet=True` draws nothing."""

    def __init__(self, stream: Optional[TextIO] = None, quiet: bool = False):
        stream = stream or sys.stderr
        self.stream = stream
        self.quiet = quiet
        self.interactive = hasattr(stream, "isatty") and stream.isatty()
        self._pending = False  # an interactive line is open (drawn with \r, no newline yet)

    def message(self, text: str) -> None:
        if not self.quiet:
            self.end_line()
            print(text, file=self.stream, flush=True)

    def bar(self, label: str, total: int) -> Optional[Callable[[int, int], None]]:
        if self.quiet:
            return None
        start = time.perf_counter()
        width = 30

        def update(done: int, total: int) -> None:
            filled = int(width * done / max(total, 1))
            text = f"{label:<11} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {time.perf_counter() - start:6.1f}s"
            if self.interactive:
                print("\r" + text, end="", file=self.stream, flush=True)
                self._pending = True
            elif done >= total:
                print(text, file=self.stream, flush=True)

        return update

    def epochs(self, label: str, max_epochs: int) -> Optional[Callable[[int, float, float], None]]:
        if self.quiet:
            return None
        start = time.perf_counter()
        best = [float("inf")]

        def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
            mark = " *" if val_loss < best[0] else ""
            best[0] = min(best[0], val_loss)
            text = (f"{label:<11} epoch {epoch + 1:>4}/{max_epochs}  loss {train_loss:.4f}  "
                    f"val {val_loss:.4f}{mark}  {time.perf_counter() - start:6.1f}s")
            if self.interactive:
                print("\r" + text + " " * 4, end="", file=self.stream, flush=True)
                self._pending = True
            elif (epoch + 1) % 10 == 0 or epoch == 0:
                print(text, file=self.stream, flush=True)

        return on_epoch

    def end_line(self) -> None:
        if self._pending:
            print(file=self.stream, flush=True)
            self._pending = False
