"""What a run shows while it starts and trains: the start-up summary (diffusers' "Running training" block) and a
progress bar in optimizer steps whose postfix counts micro-batches, so a long gradient accumulation never looks
frozen."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm.auto import tqdm


def format_summary(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A titled block of aligned ``label  value`` rows."""
    width = max((len(label) for label, _ in rows), default=0)
    lines = [f"***** {title} *****", *(f"  {label.ljust(width)}  {value}" for label, value in rows)]
    return "\n".join(lines)


def count(n: float) -> str:
    """12345678 -> '12.3M', 1234 -> '1,234'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{int(n):,}"


class StepProgress:
    """A tqdm bar over optimizer steps; with ``micro_batches > 1`` its postfix shows ``micro k/n`` during a step,
    refreshed at most every ``refresh_s`` seconds."""

    def __init__(self, total: int, initial: int, micro_batches: int, *, enabled: bool, refresh_s: float = 0.5) -> None:
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled)
        self.micro_batches = micro_batches
        self.refresh_s = refresh_s
        self._postfix: dict[str, str] = {}
        self._last = 0.0

    def micro_batch(self, k: int) -> None:
        """Micro-batch ``k`` (1-based) of the current step is done."""
        if self.micro_batches <= 1 or self.bar.disable:
            return
        now = time.monotonic()
        if now - self._last >= self.refresh_s or k == self.micro_batches:
            self._last = now
            self.bar.set_postfix({**self._postfix, "micro": f"{k}/{self.micro_batches}"})

    def step(self, loss: float | None = None) -> None:
        """One optimizer step is done (``loss``: the step's logged loss, when it was logged)."""
        if loss is not None:
            self._postfix["loss"] = f"{loss:.4f}"
            self.bar.set_postfix(self._postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
