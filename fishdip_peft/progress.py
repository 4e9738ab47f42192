"""Where one adapter's training stands: optimizer steps, refreshes, the pool, how it is driven."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .pool import RegressingPool


@dataclass
class AdapterProgress:
    """The refresh schedule of one adapter.

    Refreshes count optimizer steps (counted by an optimizer hook, whatever calls the optimizer): the
    first mask is built at the first training forward (or `step()` call) and the mask is refreshed at
    the first one after every `update_every`-th optimizer step since the last refresh, never twice at the
    same optimizer step and never inside a gradient accumulation.
    """

    pool: RegressingPool
    optimizer_steps: int = 0
    refreshes: int = 0
    attempts: int = 0  # refreshes tried, including skipped ones
    last_refresh_step: Optional[int] = None  # the optimizer-step count at the last refresh
    forwards_since_step: int = 0  # training forwards since the last optimizer step
    manual: bool = False  # `step()` was called: the training loop drives the pool and the refreshes
    rescoring: Optional[tuple[Any, Callable]] = field(default=None)

    def refresh_due(self, dynamic: bool, update_every: int) -> bool:
        if self.last_refresh_step is None:
            return True
        if self.last_refresh_step == self.optimizer_steps or not dynamic:
            return False
        return self.optimizer_steps - self.last_refresh_step >= update_every

    def refreshed(self) -> None:
        self.refreshes += 1
        self.last_refresh_step = self.optimizer_steps

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps, "refreshes": self.refreshes, "attempts": self.attempts,
                "last_refresh_step": self.last_refresh_step, "manual": self.manual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state["optimizer_steps"])
        self.refreshes = int(state["refreshes"])
        self.attempts = int(state["attempts"])
        self.last_refresh_step = None if state["last_refresh_step"] is None else int(state["last_refresh_step"])
        self.manual = bool(state["manual"])
        self.forwards_since_step = 0
