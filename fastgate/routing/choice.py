"""Which backend a request goes to: candidates, warm-first, slots, the fair wait, moves, health (issue 9).

Pure: no I/O, no asyncio, no clock and no randomness of its own. Every method takes `now` (monotonic
seconds, the I/O layer's `loop.time()`), the random source is injected, and decisions come back as plain
values. The I/O layer feeds it what its pollers and requests observe, and does what it answers.

Rules (issue 9, "Routing"):
1. Candidates are the up backends whose inventory (GET /api/tags, plus what GET /api/ps shows loaded) has
   the model, compared as Ollama resolves names (`models.parse_model_name`: `llama3` is
   `registry.ollama.ai/library/llama3:latest`). A backend whose inventory has not been read yet may have
   any model, so it is a candidate too (Ollama answers for itself if it has not). No model: every up
   backend. An invalid model name is routed like no model, so that Ollama answers it with its own error.
2. Among candidates with a free slot (`max_parallel` 0 means always free): those with the model loaded,
   else those with it present, else the rest; among those, weighted power of two choices on in-flight
   requests (two distinct draws, chance proportional to `weight`; the lower in-flight / weight wins).
   No free slot anywhere: a `Ticket` in the bounded wait (`max_queue`, `queue_timeout`), fair between
   users (`waiting.FairQueue`); the first slot that frees on any of its candidates goes to it.
3. The model on no backend (every inventory read): `Refusal.NOT_FOUND` (Ollama's 404 shape). Only on
   backends that are down while others are up: `Refusal.UNAVAILABLE` (503).
4. `move()` takes a request whose backend refused or dropped the connection before any request byte was
   written, or answered Ollama's 503 "server busy", to another candidate it has not tried: at most
   `MAX_MOVES` moves. Whether a move is allowed at all (no response byte relayed, body still at hand) is
   the caller's to know; the router only counts and chooses.
5. Health per backend is `health.Health`. Across backends: if none is up, the least recently failed of a
   request's candidates is tried anyway (never eject every backend).

Warm-first hint: a request placed on a backend marks its model loaded there at once (Ollama starts loading
it), for `WARM_HINT_S` or until /api/ps says otherwise after that, so a burst for a cold model fills one
backend's slots before it loads the model on a second.

Interface for the I/O layer (asyncio), deciding first and awaiting after:

    outcome = router.choose(model, user, loop.time())        # Placement | Ticket | Refusal
    if isinstance(outcome, Ticket):
        future = loop.create_future()
        outcome.add_done_callback(lambda t: future.done() or future.set_result(t.outcome))
        timer = loop.call_at(outcome.deadline, lambda: router.expire(loop.time()))
        try:
            outcome = await future                           # Placement | Refusal (TIMED_OUT, ...)
        except asyncio.CancelledError:
            router.cancel(ticket, loop.time())               # client gone: leave the queue / free the slot
            raise
        finally:
            timer.cancel()
    if isinstance(outcome, Refusal): answer outcome.status (Retry-After when outcome.retry_after)
    ... forward to outcome.url; on a connection error before any byte was written, or Ollama's 503 busy:
        router.record_connection_error(outcome.backend, now, refused=...)   # not for "busy"
        outcome = router.move(outcome, now, reason=...)      # again Placement | Ticket | Refusal
    ... when the exchange is over (any way it ends): router.release(placement, loop.time())

Callbacks run synchronously inside the router call that resolves the ticket (`release`, `expire`, a
health or inventory change): they must only record the result (asyncio's `Future.set_result` schedules
the waiter, which is what is wanted) and never call back into the router.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from ..config import BackendConfig, RoutingConfig, UpstreamURL
from ..models import ModelName, parse_model_name
from .health import Health, HealthChange
from .waiting import FairQueue

MAX_MOVES = 2  # rule 4: a request visits at most three backends
WARM_HINT_S = 30.0  # how long a placement counts as "loaded there" without /api/ps confirming it
MODEL_NAME_CACHE_SIZE = 4096  # resolved request model names kept; cleared whole when full
# asyncio's call_at may run a timer up to its clock resolution early: a ticket that is due within this is
# expired rather than left for a timer that will not come again.
EXPIRY_SLACK_S = 0.001


class Refusal(enum.Enum):
    """Why a request gets no backend. `status` is the answer the caller gives (errors carry their answer)."""

    NOT_FOUND = "not found"  # no backend has the model: Ollama's 404 shape
    UNAVAILABLE = "unavailable"  # only backends that are down have it
    QUEUE_FULL = "queue full"  # max_queue requests already wait
    TIMED_OUT = "timed out"  # waited queue_timeout for a slot
    UNKNOWN_BACKEND = "unknown backend"  # X-Fastgate-Backend names no backend
    NO_MOVE = "no move"  # move(): moves used up or no other candidate; answer the failure itself
    CANCELLED = "cancelled"  # cancel(): the request is gone; nobody is answered

    @property
    def status(self) -> int:
        return _REFUSAL_STATUS[self]

    @property
    def retry_after(self) -> bool:
        """Whether the answer should carry Retry-After (the condition passes by itself)."""
        return self in (Refusal.UNAVAILABLE, Refusal.QUEUE_FULL, Refusal.TIMED_OUT)


_REFUSAL_STATUS = {
    Refusal.NOT_FOUND: 404, Refusal.UNAVAILABLE: 503, Refusal.QUEUE_FULL: 503, Refusal.TIMED_OUT: 503,
    Refusal.UNKNOWN_BACKEND: 400,
    Refusal.NO_MOVE: 502,  # for "busy" the caller relays Ollama's own 503 instead
    Refusal.CANCELLED: 499,  # never sent: the client is gone (nginx's code, for logs)
}


class MoveReason(enum.Enum):
    """Why a request leaves its backend (rule 4). Each means no work was started there."""

    CONNECT_REFUSED = "connection refused"
    CONNECT_FAILED = "connection failed"  # timeout, reset, unreachable: before any request byte was written
    BUSY = "server busy"  # Ollama's 503 "server busy": its own queue is full (OLLAMA_MAX_QUEUE)


@dataclass(eq=False, slots=True)
class BackendState:
    """What the router knows about one backend. Mutated only by the router."""

    name: str
    url: UpstreamURL
    max_parallel: int  # 0: no cap
    weight: int
    health: Health = field(default_factory=Health)
    up: bool = True  # health.up, mirrored by the router after each change (read on every decision)
    inventory_known: bool = False  # a /api/tags answer has been read
    tags: frozenset[str] = frozenset()  # resolved full names from /api/tags
    ps: frozenset[str] = frozenset()  # resolved full names from /api/ps
    present: frozenset[str] = frozenset()  # tags | ps
    loaded: set[str] = field(default_factory=set)  # ps plus fresh warm hints
    warm_hints: dict[str, float] = field(default_factory=dict)  # model -> when last placed here
    slots_busy: int = 0  # placements holding one of its max_parallel slots
    in_flight: int = 0  # every placement not yet released (slot or not)
    placed: int = 0  # since start, for /metrics
    moved_away: int = 0  # requests moved from here to another backend (rule 4)

    def has_free_slot(self) -> bool:
        return self.max_parallel == 0 or self.slots_busy < self.max_parallel

    def holds(self, model: str) -> bool:
        return not self.inventory_known or model in self.present

    def __repr__(self) -> str:
        cap = self.max_parallel or "inf"
        return (f"<Backend {self.name} {self.health.state.value} slots={self.slots_busy}/{cap} "
                f"in_flight={self.in_flight} models={len(self.present)} loaded={len(self.loaded)}>")


@dataclass(eq=False, slots=True)
class Placement:
    """A request placed on a backend. Hand it back with `Router.release` exactly once (later calls do
    nothing), or to `Router.move`."""

    backend_state: BackendState = field(repr=False)
    backend: str
    url: UpstreamURL
    model: str | None  # resolved full name, None for a model-less request
    user: str
    holds_slot: bool
    placed_at: float
    pinned: bool = False  # chosen by X-Fastgate-Backend: never moved
    waited_s: float = 0.0  # time in the queue before this placement
    moves: int = 0
    tried: tuple[str, ...] = ()  # every backend this request was placed on, this one last
    released: bool = False


class TicketState(enum.Enum):
    WAITING = "waiting"
    PLACED = "placed"
    REFUSED = "refused"


class Ticket:
    """A request waiting for a slot. Resolved once, by the router, to a Placement or a Refusal."""

    __slots__ = ("model", "user", "enqueued_at", "deadline", "pin", "excluded", "moves", "tried", "state",
                 "outcome", "_callbacks")

    def __init__(self, model: str | None, user: str, enqueued_at: float, deadline: float, *, pin: str | None,
                 excluded: frozenset[str], moves: int, tried: tuple[str, ...]) -> None:
        self.model = model
        self.user = user
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.pin = pin
        self.excluded = excluded
        self.moves = moves
        self.tried = tried
        self.state = TicketState.WAITING
        self.outcome: Placement | Refusal | None = None
        self._callbacks: list[Callable[[Ticket], None]] = []

    def add_done_callback(self, callback: Callable[[Ticket], None]) -> None:
        """Call `callback(ticket)` when it is resolved; at once if it already is."""
        if self.state is TicketState.WAITING:
            self._callbacks.append(callback)
        else:
            callback(self)

    def _resolve(self, outcome: Placement | Refusal) -> None:
        self.state = TicketState.PLACED if isinstance(outcome, Placement) else TicketState.REFUSED
        self.outcome = outcome
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def __repr__(self) -> str:
        outcome = f" -> {self.outcome.backend if isinstance(self.outcome, Placement) else self.outcome}" \
            if self.outcome is not None else ""
        return f"<Ticket {self.state.value} user={self.user} model={self.model}{outcome}>"


@dataclass(slots=True)
class RouterCounters:
    """Totals since start, for /metrics."""

    placed: int = 0  # placements made (at once or from the queue)
    queued: int = 0  # requests that had to wait
    queue_full: int = 0
    timed_out: int = 0
    cancelled: int = 0
    not_found: int = 0
    unavailable: int = 0
    moves: int = 0


@dataclass(frozen=True, slots=True)
class BackendView:
    """One backend as /health and /metrics show it."""

    name: str
    url: str
    state: str  # "up", "ejected", or "last resort" (ejected, but tried because none is up)
    in_flight: int
    slots_busy: int
    max_parallel: int
    weight: int
    waiting: int  # queued requests this backend could take
    inventory_known: bool
    models: int
    loaded: tuple[str, ...]  # as Ollama displays names (`llama3:latest`), sorted
    consecutive_failures: int
    ejections: int
    ejected_for_s: float  # rest of the current hold, 0 when up or over
    placed: int
    moved_away: int


@dataclass(frozen=True, slots=True)
class RouterSnapshot:
    backends: tuple[BackendView, ...]
    healthy: int  # backends up
    queue_depth: int
    waiting_users: int
    counters: RouterCounters


_NOTHING: frozenset[str] = frozenset()


class Router:
    """The backend choice and its shared state (see the module docstring for the rules and the interface)."""

    def __init__(self, backends: Sequence[BackendConfig], settings: RoutingConfig, *,
                 rng: random.Random) -> None:
        self.settings = settings
        self.counters = RouterCounters()
        self._random = rng.random
        self._backends: list[BackendState] = []
        self._by_name: dict[str, BackendState] = {}
        self._holders: dict[str, list[BackendState]] = {}  # model -> backends whose inventory has it
        self._unknown_inventory: list[BackendState] = []  # candidates for every model until read
        self._up_count = 0
        self._equal_weights = True
        self._queue: FairQueue[Ticket] = FairQueue()
        self._names: dict[str, str | None] = {}  # request model text -> resolved full name (None: invalid)
        self._install(backends)

    # -----------------------------------------------------------------------------------------------------
    # Decisions

    def choose(self, model: ModelName | str | None, user: str, now: float, *, needs_slot: bool = True,
               pin: str | None = None, deadline: float = math.inf) -> Placement | Ticket | Refusal:
        """Place a request: on a backend now, in the queue (a Ticket), or nowhere (a Refusal).

        `model` as the request names it (or already resolved); `user` is whom fairness is between (the
        key's user). `needs_slot=False` for requests that run no model (/api/version, /api/show): they
        neither take nor wait for a slot. `pin` is an admin's X-Fastgate-Backend: that backend whatever
        its health or inventory (Ollama answers for itself), still within its slots. A ticket's deadline
        is now + queue_timeout, or `deadline` (the request's own) if that is sooner.
        """
        key = self._key(model)
        candidates = self._candidates(key, pin, _NOTHING)
        if isinstance(candidates, Refusal):
            return self._refused(candidates)
        placement = self._place(candidates, key, user, now, needs_slot, pinned=pin is not None)
        if placement is not None:
            return placement
        return self._enqueue(key, user, now, deadline, pin=pin, excluded=_NOTHING, moves=0, tried=())

    def release(self, placement: Placement, now: float) -> None:
        """The request is over (answered, failed, client gone): free its slot for the next waiter."""
        if placement.released:
            return
        placement.released = True
        backend = placement.backend_state
        backend.in_flight -= 1
        if placement.holds_slot:
            backend.slots_busy -= 1
            if len(self._queue) and self._by_name.get(backend.name) is backend:
                self._fill(backend, now)

    def move(self, placement: Placement, now: float, *, reason: MoveReason,
             deadline: float = math.inf) -> Placement | Ticket | Refusal:
        """Rule 4: release `placement` and place the request on a candidate it has not tried.

        Only for a request on which its backend started no work (see MoveReason); record a connection
        error with `record_connection_error` first, so that health sees it. `Refusal.NO_MOVE` when
        MAX_MOVES are used, the request was pinned, or no untried candidate is left: answer the failure
        itself (502 for a connection error, Ollama's 503 for busy).
        """
        if placement.released:
            raise ValueError(f"{placement!r} was already released")
        self.release(placement, now)
        if placement.pinned or placement.moves >= MAX_MOVES:
            return Refusal.NO_MOVE
        excluded = frozenset(placement.tried)
        candidates = self._candidates(placement.model, None, excluded)
        if isinstance(candidates, Refusal):
            return Refusal.NO_MOVE
        self.counters.moves += 1
        placement.backend_state.moved_away += 1
        moved = self._place(candidates, placement.model, placement.user, now, placement.holds_slot,
                            moves=placement.moves + 1, tried=placement.tried)
        if moved is not None:
            return moved
        return self._enqueue(placement.model, placement.user, now, deadline, pin=None, excluded=excluded,
                             moves=placement.moves + 1, tried=placement.tried)

    def cancel(self, ticket: Ticket, now: float) -> None:
        """The ticket's request is gone: leave the queue, or give back the slot it was just given."""
        if ticket.state is TicketState.WAITING:
            self._queue.remove(ticket)
            self.counters.cancelled += 1
            ticket._resolve(Refusal.CANCELLED)
        elif isinstance(ticket.outcome, Placement):
            self.release(ticket.outcome, now)

    def expire(self, now: float) -> list[Ticket]:
        """Refuse (TIMED_OUT) every ticket whose deadline has come; returns them."""
        expired = self._queue.pop_expired(now + EXPIRY_SLACK_S)
        for ticket in expired:
            self.counters.timed_out += 1
            ticket._resolve(Refusal.TIMED_OUT)
        return expired

    def next_deadline(self) -> float | None:
        """When `expire` next has work (for a single timer instead of one per ticket), or None."""
        return self._queue.next_deadline()

    # -----------------------------------------------------------------------------------------------------
    # Observations (from the pollers and from requests)

    def record_probe(self, backend: str, now: float, *, ok: bool,
                     refused: bool = False) -> HealthChange | None:
        """An active probe (GET /api/version) answered (`ok`) or not (`refused`: connection refused)."""
        state = self._by_name.get(backend)
        if state is None:
            return None  # removed by a reload while the probe ran
        change = state.health.success(now) if ok else state.health.failure(now, refused=refused)
        if change is not None or not self._up_count:  # all down: any failure may change the last resort
            self._health_changed(now)
        return change

    def record_connection_error(self, backend: str, now: float, *, refused: bool) -> HealthChange | None:
        """A request could not connect or lost the connection before any byte was written (passive
        health): refused ejects at once, anything else counts like a failed probe."""
        state = self._by_name.get(backend)
        if state is None:
            return None
        change = state.health.failure(now, refused=refused)
        if change is not None or not self._up_count:
            self._health_changed(now)
        return change

    def set_inventory(self, backend: str, names: Iterable[str], now: float) -> None:
        """The models GET /api/tags listed (their `name` fields)."""
        state = self._by_name.get(backend)
        if state is None:
            return
        state.inventory_known = True
        state.tags = self._resolve_all(names)
        self._update_present(state, now)

    def set_loaded(self, backend: str, names: Iterable[str], now: float) -> None:
        """The models GET /api/ps listed as loaded. Warm hints younger than WARM_HINT_S stay loaded."""
        state = self._by_name.get(backend)
        if state is None:
            return
        state.ps = self._resolve_all(names)
        state.warm_hints = {model: at for model, at in state.warm_hints.items() if now - at < WARM_HINT_S}
        state.loaded = set(state.ps).union(state.warm_hints)
        self._update_present(state, now)

    def model_missing(self, backend: str, model: ModelName | str, now: float) -> None:
        """The backend answered 404 "model not found" for a model its inventory listed: forget it there
        until the next /api/tags (which the caller should fetch at once)."""
        state = self._by_name.get(backend)
        key = self._key(model)
        if state is None or key is None:
            return
        state.tags = state.tags - {key}
        state.ps = state.ps - {key}
        state.loaded.discard(key)
        state.warm_hints.pop(key, None)
        self._update_present(state, now)

    def reconfigure(self, backends: Sequence[BackendConfig], settings: RoutingConfig, now: float) -> None:
        """A reload: keep what is known about backends that stay (by name), add new ones, drop the rest.
        Placements on dropped backends still release cleanly; waiters pinned to them are refused."""
        self.settings = settings
        self._install(backends)
        self._dispatch(now)

    # -----------------------------------------------------------------------------------------------------
    # Views

    @property
    def healthy(self) -> bool:
        """At least one backend is up (/health answers 200)."""
        return self._up_count > 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def backend_names(self) -> list[str]:
        return [backend.name for backend in self._backends]

    def usable_backends(self) -> list[str]:
        """Where model-less work goes (fan-out of /api/pull and /api/delete, aggregation of /api/tags and
        /api/ps, /api/version): the up backends, or the least recently failed one when none is up."""
        candidates = self._candidates(None, None, _NOTHING)
        assert isinstance(candidates, list)  # no model, no pin: never refused
        if self._up_count:
            return [backend.name for backend in candidates]
        return [candidates[0].name]

    def snapshot(self, now: float) -> RouterSnapshot:
        """Everything /health and /metrics show. O(queue x backends): for scrapes, not per request."""
        last_resort = set()
        if not self._up_count:
            last_resort = {name for name in self.usable_backends()}
        waiting = list(self._queue.in_fair_order())
        views = []
        for backend in self._backends:
            health = backend.health
            if health.up:
                state = "up"
            else:
                state = "last resort" if backend.name in last_resort else "ejected"
            views.append(BackendView(
                name=backend.name, url=str(backend.url), state=state, in_flight=backend.in_flight,
                slots_busy=backend.slots_busy, max_parallel=backend.max_parallel, weight=backend.weight,
                waiting=sum(1 for ticket in waiting if self._serves(ticket, backend)),
                inventory_known=backend.inventory_known, models=len(backend.present),
                loaded=tuple(sorted(_display_name(model) for model in backend.loaded)),
                consecutive_failures=health.consecutive_failures, ejections=health.ejections,
                ejected_for_s=0.0 if health.up else max(0.0, health.ejected_until - now),
                placed=backend.placed, moved_away=backend.moved_away))
        return RouterSnapshot(backends=tuple(views), healthy=self._up_count, queue_depth=len(self._queue),
                              waiting_users=self._queue.users(), counters=replace(self.counters))

    def __repr__(self) -> str:
        return f"<Router {self._up_count}/{len(self._backends)} up, {len(self._queue)} waiting>"

    # -----------------------------------------------------------------------------------------------------
    # Internals

    def _install(self, configs: Sequence[BackendConfig]) -> None:
        if not configs:
            raise ValueError("the router needs at least one backend")
        backends = []
        for config in configs:
            state = self._by_name.get(config.name)
            if state is None:
                state = BackendState(config.name, config.url, config.max_parallel, config.weight)
            else:  # a reload keeps health, inventory and counts; the settings are the new file's
                state.url, state.max_parallel, state.weight = config.url, config.max_parallel, config.weight
            backends.append(state)
        self._backends = backends
        self._by_name = {backend.name: backend for backend in backends}
        self._equal_weights = len({backend.weight for backend in backends}) == 1
        self._reindex()

    def _reindex(self) -> None:
        holders: dict[str, list[BackendState]] = {}
        for backend in self._backends:
            for model in backend.present:
                holders.setdefault(model, []).append(backend)
        self._holders = holders
        self._unknown_inventory = [backend for backend in self._backends if not backend.inventory_known]
        for backend in self._backends:
            backend.up = backend.health.up
        self._up_count = sum(1 for backend in self._backends if backend.up)

    def _update_present(self, backend: BackendState, now: float) -> None:
        present = backend.tags | backend.ps
        if present != backend.present or (backend.inventory_known and backend in self._unknown_inventory):
            backend.present = present
            self._reindex()
            self._dispatch(now)  # waiters may have a new candidate, or none left

    def _health_changed(self, now: float) -> None:
        for backend in self._backends:
            backend.up = backend.health.up
        self._up_count = sum(1 for backend in self._backends if backend.up)
        self._dispatch(now)

    def _key(self, model: ModelName | str | None) -> str | None:
        """The resolved full name a model is compared by (a str: its hash is computed once and kept)."""
        if model is None:
            return None
        if isinstance(model, ModelName):
            return str(model)
        try:
            return self._names[model]
        except KeyError:
            pass
        name = parse_model_name(model)
        key = str(name) if name is not None else None
        if len(self._names) >= MODEL_NAME_CACHE_SIZE:
            self._names.clear()  # bounded: request model names are chosen by clients
        self._names[model] = key
        return key

    @staticmethod
    def _resolve_all(names: Iterable[str]) -> frozenset[str]:
        resolved = (parse_model_name(name) for name in names)
        return frozenset(str(name) for name in resolved if name is not None)

    def _candidates(self, model: str | None, pin: str | None,
                    excluded: frozenset[str]) -> list[BackendState] | Refusal:
        """Rules 1, 3 and 5: the backends this request may run on, ignoring slots."""
        if pin is not None:
            pinned = self._by_name.get(pin)
            return [pinned] if pinned is not None else Refusal.UNKNOWN_BACKEND
        if model is None:
            pool = self._backends
        else:
            pool = self._holders.get(model, [])
            if self._unknown_inventory:
                pool = pool + self._unknown_inventory
            if not pool:
                return Refusal.NOT_FOUND
        if self._up_count:
            if excluded:
                up = [backend for backend in pool if backend.up and backend.name not in excluded]
            else:
                up = [backend for backend in pool if backend.up]
            return up or Refusal.UNAVAILABLE
        # Every backend looks down. Ejecting them all would turn fastgate's view (perhaps its own network
        # trouble) into a total outage: try the one whose last failure is oldest.
        rest = [backend for backend in pool if backend.name not in excluded]
        if not rest:
            return Refusal.UNAVAILABLE
        return [min(rest, key=_last_failure_at)]

    def _place(self, candidates: list[BackendState], model: str | None, user: str, now: float,
               needs_slot: bool, *, pinned: bool = False, moves: int = 0, tried: tuple[str, ...] = (),
               waited_s: float = 0.0) -> Placement | None:
        """Rule 2 without the wait: the best candidate with a free slot, or None."""
        if needs_slot:
            # has_free_slot(), inlined: this runs for every candidate of every request
            free = [backend for backend in candidates
                    if backend.max_parallel == 0 or backend.slots_busy < backend.max_parallel]
            if not free:
                return None
        else:
            free = candidates
        backend = self._pick(_best_tier(free, model))
        return self._start(backend, model, user, now, needs_slot, pinned=pinned, moves=moves, tried=tried,
                           waited_s=waited_s)

    def _pick(self, tier: list[BackendState]) -> BackendState:
        """Weighted power of two choices: two distinct draws (chance proportional to weight), the one
        with fewer in-flight requests per unit of weight wins; a tie goes to the first draw (random)."""
        count = len(tier)
        if count == 1:
            return tier[0]
        if self._equal_weights:
            first = int(self._random() * count)
            second = int(self._random() * (count - 1))
            if second >= first:
                second += 1
        else:
            total = 0
            for backend in tier:
                total += backend.weight
            first = _weighted_draw(tier, self._random() * total, -1)
            second = _weighted_draw(tier, self._random() * (total - tier[first].weight), first)
        a, b = tier[first], tier[second]
        # a.in_flight / a.weight <= b.in_flight / b.weight, without division
        return a if a.in_flight * b.weight <= b.in_flight * a.weight else b

    def _start(self, backend: BackendState, model: str | None, user: str, now: float, holds_slot: bool, *,
               pinned: bool, moves: int, tried: tuple[str, ...], waited_s: float) -> Placement:
        backend.in_flight += 1
        backend.placed += 1
        if holds_slot:
            backend.slots_busy += 1
            if model is not None:
                backend.loaded.add(model)  # warm hint: Ollama loads it now (see module docstring)
                backend.warm_hints[model] = now
        self.counters.placed += 1
        return Placement(backend, backend.name, backend.url, model, user, holds_slot, now, pinned=pinned,
                         waited_s=waited_s, moves=moves, tried=(*tried, backend.name))

    def _enqueue(self, model: str | None, user: str, now: float, deadline: float, *, pin: str | None,
                 excluded: frozenset[str], moves: int, tried: tuple[str, ...]) -> Ticket | Refusal:
        if len(self._queue) >= self.settings.max_queue:
            self.counters.queue_full += 1
            return Refusal.QUEUE_FULL
        ticket = Ticket(model, user, now, min(now + self.settings.queue_timeout, deadline), pin=pin,
                        excluded=excluded, moves=moves, tried=tried)
        self._queue.push(ticket)
        self.counters.queued += 1
        return ticket

    def _serves(self, ticket: Ticket, backend: BackendState) -> bool:
        """Whether `backend` is one of the ticket's candidates now (slots aside): `_candidates`, for one."""
        if ticket.pin is not None:
            return ticket.pin == backend.name
        if backend.name in ticket.excluded:
            return False
        if ticket.model is not None and not backend.holds(ticket.model):
            return False
        if backend.up:
            return True
        if self._up_count:
            return False
        candidates = self._candidates(ticket.model, None, ticket.excluded)
        return isinstance(candidates, list) and backend in candidates

    def _grant(self, ticket: Ticket, backend: BackendState, now: float) -> None:
        self._queue.served(ticket)
        placement = self._start(backend, ticket.model, ticket.user, now, True, pinned=ticket.pin is not None,
                                moves=ticket.moves, tried=ticket.tried, waited_s=now - ticket.enqueued_at)
        ticket._resolve(placement)

    def _fill(self, backend: BackendState, now: float) -> None:
        """A slot freed on `backend`: the first waiter, in turn order, that may run there gets it."""
        while len(self._queue) and backend.has_free_slot():
            for ticket in self._queue.in_fair_order():
                if self._serves(ticket, backend):
                    break
            else:
                return
            self._grant(ticket, backend, now)

    def _dispatch(self, now: float) -> None:
        """After a change of health, inventory or configuration: give waiters the slots they can now use,
        in turn order, and refuse those that have no candidate left."""
        if not len(self._queue):
            return
        for ticket in list(self._queue.in_fair_order()):
            candidates = self._candidates(ticket.model, ticket.pin, ticket.excluded)
            if isinstance(candidates, Refusal):
                self._queue.remove(ticket)
                ticket._resolve(self._refused(Refusal.NO_MOVE if ticket.moves else candidates))
                continue
            placement_free = [backend for backend in candidates if backend.has_free_slot()]
            if placement_free:
                self._grant(ticket, self._pick(_best_tier(placement_free, ticket.model)), now)

    def _refused(self, refusal: Refusal) -> Refusal:
        if refusal is Refusal.NOT_FOUND:
            self.counters.not_found += 1
        elif refusal is Refusal.UNAVAILABLE:
            self.counters.unavailable += 1
        return refusal


def _best_tier(free: list[BackendState], model: str | None) -> list[BackendState]:
    """Rule 2's preference: model loaded, else model present, else the rest (inventory not read yet)."""
    if model is None or len(free) == 1:
        return free
    warm = [backend for backend in free if model in backend.loaded]
    if warm:
        return warm
    return [backend for backend in free if model in backend.present] or free


def _weighted_draw(tier: list[BackendState], point: float, skip: int) -> int:
    """The index `point` (in [0, total weight of the tier without `skip`)) falls on."""
    chosen = -1
    for index, backend in enumerate(tier):
        if index == skip:
            continue
        chosen = index
        point -= backend.weight
        if point < 0:
            break
    return chosen  # the last eligible one if rounding left point at exactly 0


def _last_failure_at(backend: BackendState) -> float:
    return backend.health.last_failure_at


def _display_name(model: str) -> str:
    name = parse_model_name(model)
    return name.shortest if name is not None else model
