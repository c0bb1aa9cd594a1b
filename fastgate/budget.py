"""How many request-body bytes fastgate holds in memory at once, across every connection.

Pure. A keyless request's body is buffered to find its `"api_key"`, and a restricted key's to read its model:
each is bounded by `auth.max_body_bytes`, but many connections at once could together hold far more memory
than the machine has. The budget (`auth.max_buffered_bytes`) bounds the sum: a reader takes bytes before it
keeps them and gives them back when it lets go, and a reader that cannot take more is refused (503 with
Retry-After) before it reads on.
"""

from __future__ import annotations


class BodyBudget:
    __slots__ = ("limit", "used", "refusals")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refusals = 0

    def take(self, nbytes: int) -> bool:
        """Reserve `nbytes`; False (and nothing reserved) when that would pass the limit."""
        if self.used + nbytes > self.limit:
            self.refusals += 1
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)

    def __repr__(self) -> str:
        return f"BodyBudget({self.used}/{self.limit} bytes)"
