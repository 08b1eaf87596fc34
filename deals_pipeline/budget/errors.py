"""The budget's own errors: a run that must stop, a budget that never recovers, an unknown state."""

from __future__ import annotations


class BudgetError(RuntimeError):
    """Base of the budget's own errors."""


class BudgetDeadline(BudgetError):
    """The tokens for the next request cannot arrive before the run's deadline (raised without sleeping).

    Attributes: ``wait_ms`` (None: never, e.g. refill rate 0), ``need`` (balance level waited for),
    ``cost``, ``deadline_ms``, ``now_ms``.
    """

    def __init__(self, message: str, *, wait_ms: int | None, need: int, cost: int, deadline_ms: int | None, now_ms: int):
        super().__init__(message)
        self.wait_ms = wait_ms
        self.need = need
        self.cost = cost
        self.deadline_ms = deadline_ms
        self.now_ms = now_ms


class BudgetStalled(BudgetDeadline):
    """The balance can never recover (learned refill rate is 0) and no deadline was given."""


class BudgetNeedsSync(BudgetError):
    """No server status is known: make one free ``/token`` call and ``observe()`` it (or pass ``sync=``)."""
