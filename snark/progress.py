"""Progress of slow start-up steps (downloading, loading and writing weights) as log lines.

A tqdm bar redraws one line with carriage returns: on a terminal that is what a person wants, in a
log collector (systemd, Docker, Kubernetes) it is a pile of half-lines. Off a terminal the bars are
replaced by ``ProgressLines``: one INFO line when a step starts, one at each quarter, one when it ends.
"""

from __future__ import annotations

import io
import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("snark.progress")

_STEPS = 4  # a line at 25 %, 50 %, 75 % and 100 %


class ProgressLines(tqdm):
    """A tqdm that draws nothing and logs a line at the start, at each quarter and at the end."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["file"] = io.StringIO()  # the bar tqdm would draw goes nowhere
        kwargs.pop("disable", None)
        self._logged_step = -1
        super().__init__(*args, **kwargs)
        if self.total:
            log.info("%s: 0 of %s", self.desc or "progress", self._amount(self.total))

    def _amount(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
        return f"{n:g}"  # counted items (tensors, files): the description says what they are

    def update(self, n: float | None = 1) -> bool | None:
        # Checked at every update, not in display(): tqdm skips displays within its mininterval, and a
        # quarter line must not depend on how fast the step runs.
        result = super().update(n)
        self._log_reached_quarters()
        return result

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # Iterating a tqdm (``for x in tqdm(items)``) skips update(): its progress shows up here, at
        # tqdm's own pace, and in close().
        self._log_reached_quarters()
        return True  # nothing to draw

    def close(self) -> None:
        if not self.disable:
            self._log_reached_quarters()
        super().close()

    def _log_reached_quarters(self) -> None:
        if not self.total:
            return
        step = int(_STEPS * min(self.n, self.total) / self.total)
        if step > self._logged_step and step > 0:
            self._logged_step = step
            log.info(
                "%s: %d%% (%s of %s)",
                self.desc or "progress",
                100 * step // _STEPS,
                self._amount(self.n),
                self._amount(self.total),
            )


def progress_class(interactive: bool | None = None) -> type[tqdm]:
    """The tqdm class for this process: a bar on an interactive terminal, ``ProgressLines`` elsewhere."""
    if interactive is None:
        interactive = sys.stderr.isatty()
    return tqdm if interactive else ProgressLines


def route_transformers_progress(interactive: bool | None = None) -> None:
    """Make transformers' own bars ("Loading weights", "Writing model shards") follow ``progress_class``."""
    from transformers.utils import logging as transformers_logging

    cls = progress_class(interactive)
    if cls is tqdm:
        transformers_logging.set_tqdm_hook(None)
        return
    transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: cls(*args, **kwargs))
