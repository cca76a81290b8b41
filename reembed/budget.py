"""What a migration to a model behind an API may spend, shared by all of its workers.

Every request reserves its estimated cost (its tokens as counted before sending, at the model's
declared price) in the migration's progress in Redis, atomically against ``--max-cost``, before
it goes; its answer settles the reservation to what it really cost (the server's token count
when it reports one). A request whose reservation would pass the limit is not sent: the
migration pauses, resumable with a higher ``--max-cost``. So the spend stops within one request
of the limit, however many workers run, and tokens and money spent show in ``status``.
"""

from __future__ import annotations

from reembed.errors import BudgetReachedError
from reembed.progress import Progress


class Budget:
    """One migration's spend; its limit lives in the progress hash (``Progress.set_budget``), so a
    resume that raises it reaches every worker at once."""

    def __init__(self, progress: Progress, price_per_million_tokens: float) -> None:
        self.progress = progress
        self.price = price_per_million_tokens / 1_000_000

    def reserve(self, tokens: int) -> float:
        """Reserve a request of ``tokens`` tokens; returns its estimated cost.

        Raises:
            BudgetReachedError: sending it could pass the limit.
        """
        cost = tokens * self.price
        if not self.progress.reserve_cost(cost):
            _, spent = self.progress.spend()
            limit = self.progress.get().get("max_cost")
            raise BudgetReachedError(
                f"migration {self.progress.id} reached its budget: {spent:.4f} spent of --max-cost {limit}, and "
                f"the next request would cost about {cost:.4f}; resume it with a higher --max-cost "
                f"(`reembed resume {self.progress.id} --max-cost N`)")
        return cost

    def settle(self, reserved: float, tokens: int) -> None:
        """The request answered having used ``tokens`` (0: it was never answered)."""
        self.progress.settle_cost(reserved, tokens, tokens * self.price)
