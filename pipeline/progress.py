"""The console of every job: one tqdm bar per long step and one summary line when it ends.

Bars go to stderr (stdout stays for results a script may parse: a URI, ``--json``). On a
terminal they redraw in place; in a log file or CI they update at most every few seconds, so a
step leaves one line, not hundreds. Ray's own progress output is off in quiet mode
(``runtime.init_ray``): these bars are the only ones.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
        **kwargs) -> tqdm:
    """A progress bar for one step (``desc``); use as an iterator or call ``update(n)``."""
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if tty else 5.0, leave=True, **kwargs)


def summary(step: str, text: str) -> None:
    """The one line a finished step prints (to stdout, after its bar)."""
    print(f"{step}: {text}", flush=True)


class Poller:
    """Follows work running elsewhere (Ray Train workers) with a bar updated from ``poll``.

    ``poll()`` returns ``(done, postfix)``: units finished so far and the bar's postfix. It runs
    in a daemon thread every ``every`` seconds until the ``with`` block ends, then once more.
    """

    def __init__(self, poll: Callable[[], tuple[int, dict]], *, total: int, desc: str, unit: str,
                 every: float = 2.0):
        self._poll, self._every = poll, every
        self._bar = bar(total=total, desc=desc, unit=unit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{desc}", daemon=True)

    def _update(self) -> None:
        try:
            done, postfix = self._poll()
        except Exception:   # noqa: BLE001 - a failed poll must never fail the job it watches
            return
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        if sys.stderr.isatty():           # the elapsed time ticks; a log file gets no extra lines
            self._bar.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._update()

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._update()
        self._bar.close()
