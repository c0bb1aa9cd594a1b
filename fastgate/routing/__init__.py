"""Several Ollama backends behind one fastgate (issue 9): which backend a request goes to.

`choice` (the Router), `health` (one backend's up/ejected state), `waiting` (the fair bounded wait) and
`aggregate` (what the client gets from several backends' answers: merged listings, fanned-out pull, delete
and copy) are pure: values in, decisions out, `now` passed in, no asyncio. The pollers that feed them
(GET /api/version, /api/tags, /api/ps per backend) and `fastgate.fanout` (the requests to several backends
at once) are I/O, outside the pure list of tests/test_layering.py.
"""

from .choice import (
    MAX_MOVES,
    BackendView,
    MoveReason,
    Placement,
    Refusal,
    Router,
    RouterSnapshot,
    Ticket,
    TicketState,
)
from .health import HealthChange, HealthState

__all__ = ["MAX_MOVES", "BackendView", "HealthChange", "HealthState", "MoveReason", "Placement", "Refusal",
           "Router", "RouterSnapshot", "Ticket", "TicketState"]
