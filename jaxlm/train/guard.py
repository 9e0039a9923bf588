"""The bad-step guard: tells good steps from bad ones and says when to go back to a checkpoint.

A step is bad when its update was dropped (a non-finite loss or gradient; the step itself
keeps the old params) or, with `spike_factor` > 0, when its loss exceeds `spike_factor` times
the running mean of the good steps' losses (an exponential mean, weight 0.1 on the newest).
`max_bad_steps` bad steps in a row call for a restore of the last checkpoint.
"""
from __future__ import annotations

from typing import Optional


class Guard:
    def __init__(self, spike_factor: float, max_bad_steps: int):
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.loss_mean: Optional[float] = None
        self.bad_run = 0

    def judge(self, loss: float, update_ok: bool) -> str:
        """"ok", "nonfinite" or "spike" for one finished step."""
        spike = (update_ok and self.spike_factor and self.loss_mean is not None
                 and loss > self.spike_factor * self.loss_mean)
        if update_ok and not spike:
            self.bad_run = 0
            self.loss_mean = loss if self.loss_mean is None else 0.9 * self.loss_mean + 0.1 * loss
            return "ok"
        self.bad_run += 1
        return "spike" if spike else "nonfinite"

    @property
    def must_restore(self) -> bool:
        return self.bad_run >= self.max_bad_steps

    def state(self) -> dict:
        """What a checkpoint keeps of the guard (JSON), so that a resumed run judges steps as the run
        that was not stopped would have."""
        return {"loss_mean": self.loss_mean, "bad_run": self.bad_run}

    def load(self, state: dict) -> None:
        self.loss_mean, self.bad_run = state["loss_mean"], state["bad_run"]

    def reset(self) -> None:
        """After a restore (or a failed one): count bad steps afresh."""
        self.bad_run = 0
