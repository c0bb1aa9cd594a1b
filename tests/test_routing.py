"""The backend choice (fastgate.routing, issue 9 rules 1-5) by value: no sockets, fake time, seeded RNG."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fastgate.config import BackendConfig, RoutingConfig, parse_upstream_url
from fastgate.models import parse_model_name
from fastgate.routing import (
    MAX_MOVES,
    HealthChange,
    MoveReason,
    Placement,
    Refusal,
    Router,
    Ticket,
    TicketState,
)
from fastgate.routing.choice import WARM_HINT_S
from fastgate.routing.health import (
    BASE_EJECTION_S,
    FORGET_EJECTIONS_AFTER_S,
    MAX_EJECTION_S,
    Health,
    HealthState,
)
from fastgate.routing.waiting import FairQueue

LLAMA = "llama3:8b"
QWEN = "qwen2.5:7b"


def backend(name: str, max_parallel: int = 0, weight: int = 1, host: int | None = None) -> BackendConfig:
    address = host if host is not None else sum(map(ord, name)) % 250 + 1
    return BackendConfig(name, parse_upstream_url("test", f"http://10.0.0.{address}:11434"), max_parallel,
                         weight)


def make_router(*backends: BackendConfig, seed: int = 7, **routing: float) -> Router:
    return Router(backends, RoutingConfig(**routing), rng=random.Random(seed))  # type: ignore[arg-type]


def placed(outcome: Placement | Ticket | Refusal | None) -> Placement:
    assert isinstance(outcome, Placement), outcome
    return outcome


def waiting(outcome: Placement | Ticket | Refusal) -> Ticket:
    assert isinstance(outcome, Ticket), outcome
    assert outcome.state is TicketState.WAITING
    return outcome


def spread(router: Router, now: float, times: int = 30) -> set[str]:
    """Where `times` model-less requests go, each released before the next."""
    names = set()
    for _ in range(times):
        placement = placed(router.choose(None, "u", now, needs_slot=False))
        names.add(placement.backend)
        router.release(placement, now)
    return names


def eject(router: Router, name: str, now: float) -> None:
    assert router.record_probe(name, now, ok=False) is None
    assert router.record_probe(name, now + 1, ok=False) is HealthChange.EJECTED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self, step: float = 0.0) -> float:
        self.now += step
        return self.now


# ---------------------------------------------------------------------------------------------------------
# Rule 1: candidates


def test_a_model_only_on_b_always_goes_to_b() -> None:
    router = make_router(backend("a"), backend("b"), backend("c"))
    router.set_inventory("a", [QWEN], 0)
    router.set_inventory("b", [QWEN, LLAMA], 0)
    router.set_inventory("c", [], 0)
    assert {placed(router.choose(LLAMA, "u", 1)).backend for _ in range(100)} == {"b"}


def test_names_are_compared_as_ollama_resolves_them() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", ["LLama3:latest", "me/custom:q4"], 0)
    router.set_inventory("b", ["llama3:8b"], 0)
    for request in ("llama3", "LLAMA3:latest", "registry.ollama.ai/library/llama3", " llama3 "):
        assert placed(router.choose(request, "u", 1)).backend == "a", request
    assert placed(router.choose("registry.ollama.ai/me/custom:q4", "u", 1)).backend == "a"
    assert placed(router.choose("llama3:8b", "u", 1)).backend == "b"
    resolved = parse_model_name("llama3")
    assert resolved is not None and placed(router.choose(resolved, "u", 1)).backend == "a"
    assert placed(router.choose("llama3", "u", 1)).model == "registry.ollama.ai/library/llama3:latest"


def test_no_model_goes_to_any_healthy_backend() -> None:
    router = make_router(backend("a"), backend("b"), backend("c"))
    eject(router, "c", 0)
    assert spread(router, 5, times=300) == {"a", "b"}


def test_a_backend_whose_inventory_is_unknown_may_have_any_model() -> None:
    # At start no /api/tags has been read: requests must not all be 404 until the first poll.
    router = make_router(backend("a"), backend("b"))
    assert placed(router.choose(LLAMA, "u", 0)).backend in {"a", "b"}
    router.set_inventory("a", [QWEN], 1)
    assert placed(router.choose(LLAMA, "u", 1)).backend == "b"  # b is still unknown: it may have it
    router.set_inventory("b", [QWEN], 2)
    assert router.choose(LLAMA, "u", 2) is Refusal.NOT_FOUND


def test_an_invalid_model_name_is_routed_like_no_model() -> None:
    # Ollama answers an invalid name with its own error; fastgate does not invent one.
    router = make_router(backend("a"))
    router.set_inventory("a", [LLAMA], 0)
    assert placed(router.choose("bad name!", "u", 1)).model is None


# ---------------------------------------------------------------------------------------------------------
# Rule 2: warm first, slots, least in-flight


def test_warm_first_loaded_with_a_free_slot_wins_over_a_cold_backend() -> None:
    router = make_router(backend("a", max_parallel=4), backend("b", max_parallel=4))
    router.set_inventory("a", [LLAMA, QWEN], 0)
    router.set_inventory("b", [LLAMA, QWEN], 0)
    router.set_loaded("a", [LLAMA], 0)
    router.set_loaded("b", [QWEN], 0)
    clock = Clock()
    running: list[Placement] = []
    to_a = 0
    for i in range(200):
        placement = placed(router.choose(LLAMA, f"user{i % 5}", clock(0.01)))
        to_a += placement.backend == "a"
        running.append(placement)
        if len(running) == 3:  # three at a time: a's four slots are never all taken
            router.release(running.pop(0), clock())
    assert to_a >= 0.95 * 200


def test_when_the_warm_backend_is_full_a_present_one_takes_the_request() -> None:
    router = make_router(*(backend(name, max_parallel=1) for name in "abc"))
    for name in "abc":
        router.set_inventory(name, [LLAMA], 0)
    router.set_loaded("a", [LLAMA], 0)
    assert placed(router.choose(LLAMA, "u", 1)).backend == "a"
    assert placed(router.choose(LLAMA, "u", 1)).backend in {"b", "c"}


def test_present_beats_a_backend_whose_inventory_is_unknown() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [LLAMA], 0)
    router.set_loaded("a", [], 0)
    assert {placed(router.choose(LLAMA, "u", 1, needs_slot=False)).backend for _ in range(50)} == {"a"}


def test_a_burst_for_a_cold_model_stays_on_the_backend_that_started_loading_it() -> None:
    router = make_router(backend("a", max_parallel=4), backend("b", max_parallel=4))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA], 0)
    first = placed(router.choose(LLAMA, "u", 1)).backend
    assert [placed(router.choose(LLAMA, "u", 1)).backend for _ in range(3)] == [first] * 3
    other = "b" if first == "a" else "a"
    assert placed(router.choose(LLAMA, "u", 1)).backend == other  # first's four slots are taken


def test_warm_hints_expire_when_api_ps_does_not_confirm_them() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA], 0)
    first = placed(router.choose(LLAMA, "u", 1))
    router.release(first, 2)
    router.set_loaded(first.backend, [], 2)  # still loading: the hint stays
    assert placed(router.choose(LLAMA, "u", 3)).backend == first.backend
    router.set_loaded(first.backend, [], 3 + WARM_HINT_S)
    router.set_loaded("b" if first.backend == "a" else "a", [LLAMA], 3 + WARM_HINT_S)
    assert placed(router.choose(LLAMA, "u", 4 + WARM_HINT_S)).backend != first.backend


def in_flight(router: Router) -> dict[str, int]:
    return {view.name: view.in_flight for view in router.snapshot(0).backends}


def test_least_in_flight_by_power_of_two_choices() -> None:
    router = make_router(backend("a"), backend("b"), backend("c"))
    for _ in range(30):
        router.choose(None, "u", 0, needs_slot=False)  # never released
    counts = in_flight(router).values()
    assert max(counts) - min(counts) <= 3  # balanced, not merely random
    busy = make_router(backend("a"), backend("b"))
    for _ in range(5):
        placement = placed(busy.choose(None, "u", 0, needs_slot=False))
        if placement.backend == "b":
            busy.release(placement, 0)
    assert in_flight(busy)["b"] == 0 and in_flight(busy)["a"] > 0
    # a holds every request in flight, b none: with two backends both are drawn, and b wins
    assert placed(busy.choose(None, "u", 1, needs_slot=False)).backend == "b"


def test_weights_set_the_share_among_equals() -> None:
    router = make_router(backend("big", weight=3), backend("small", weight=1))
    chosen: Counter[str] = Counter()
    for _ in range(4000):
        placement = placed(router.choose(None, "u", 0, needs_slot=False))
        chosen[placement.backend] += 1
        router.release(placement, 0)
    assert 0.72 < chosen["big"] / 4000 < 0.78


def test_weights_balance_in_flight_in_proportion() -> None:
    router = make_router(backend("big", weight=3), backend("small", weight=1))
    for _ in range(400):
        router.choose(None, "u", 0, needs_slot=False)
    counts = in_flight(router)
    assert 2.5 < counts["big"] / counts["small"] < 3.5


def test_slots_two_run_and_the_third_waits_then_runs_on_release() -> None:
    router = make_router(backend("a", max_parallel=1), backend("b", max_parallel=1))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA], 0)
    first, second = placed(router.choose(LLAMA, "u1", 1)), placed(router.choose(LLAMA, "u2", 1))
    assert {first.backend, second.backend} == {"a", "b"}
    third = waiting(router.choose(LLAMA, "u3", 1))
    seen: list[Placement | Refusal | None] = []
    third.add_done_callback(lambda ticket: seen.append(ticket.outcome))
    assert seen == [] and router.queue_depth == 1
    router.release(second, 4)
    assert third.state is TicketState.PLACED and seen == [third.outcome]
    assert isinstance(third.outcome, Placement)
    assert third.outcome.backend == second.backend and third.outcome.waited_s == 3
    assert router.queue_depth == 0
    late: list[object] = []
    third.add_done_callback(late.append)  # already resolved: called at once
    assert late == [third]


def test_requests_that_need_no_slot_neither_take_nor_wait_for_one() -> None:
    router = make_router(backend("a", max_parallel=1))
    slot = placed(router.choose(LLAMA, "u", 0))
    version = placed(router.choose(None, "u", 0, needs_slot=False))
    assert not version.holds_slot
    waiting(router.choose(LLAMA, "u", 0))
    router.release(version, 1)  # frees no slot: the waiter still waits
    assert router.queue_depth == 1
    router.release(slot, 2)
    assert router.queue_depth == 0


def test_release_is_idempotent() -> None:
    router = make_router(backend("a", max_parallel=1))
    placement = placed(router.choose(LLAMA, "u", 0))
    router.release(placement, 1)
    router.release(placement, 1)
    view = router.snapshot(1).backends[0]
    assert (view.in_flight, view.slots_busy) == (0, 0)


def test_max_queue_exceeded_is_queue_full() -> None:
    router = make_router(backend("a", max_parallel=1), max_queue=2)
    placed(router.choose(LLAMA, "u", 0))
    waiting(router.choose(LLAMA, "u", 0))
    waiting(router.choose(LLAMA, "v", 0))
    full = router.choose(LLAMA, "w", 0)
    assert full is Refusal.QUEUE_FULL and full.status == 503 and full.retry_after
    assert router.counters.queue_full == 1 and router.queue_depth == 2


def test_max_queue_zero_never_waits() -> None:
    router = make_router(backend("a", max_parallel=1), max_queue=0)
    placed(router.choose(LLAMA, "u", 0))
    assert router.choose(LLAMA, "u", 0) is Refusal.QUEUE_FULL


def test_queue_timeout() -> None:
    router = make_router(backend("a", max_parallel=1), queue_timeout=30.0)
    running = placed(router.choose(LLAMA, "u", 100))
    ticket = waiting(router.choose(LLAMA, "v", 100))
    later = waiting(router.choose(LLAMA, "w", 110))
    assert ticket.deadline == 130.0 and router.next_deadline() == 130.0
    outcomes: list[object] = []
    ticket.add_done_callback(lambda t: outcomes.append(t.outcome))
    assert router.expire(129.9) == []
    assert router.expire(130.0) == [ticket]
    assert ticket.state is TicketState.REFUSED and outcomes == [Refusal.TIMED_OUT]
    assert Refusal.TIMED_OUT.status == 503 and router.counters.timed_out == 1
    assert router.next_deadline() == 140.0
    router.release(running, 131)  # the slot goes to the one still waiting
    assert later.state is TicketState.PLACED


def test_expire_tolerates_a_timer_that_fires_a_hair_early() -> None:
    # asyncio's call_at may run a timer up to its clock resolution before the deadline.
    router = make_router(backend("a", max_parallel=1), queue_timeout=30.0)
    placed(router.choose(LLAMA, "u", 0))
    ticket = waiting(router.choose(LLAMA, "u", 0))
    assert router.expire(29.9995) == [ticket]


def test_a_callers_own_deadline_shortens_the_wait() -> None:
    router = make_router(backend("a", max_parallel=1), queue_timeout=30.0)
    placed(router.choose(LLAMA, "u", 0))
    assert waiting(router.choose(LLAMA, "u", 0, deadline=5.0)).deadline == 5.0


def test_fairness_a_burst_does_not_starve_another_user() -> None:
    router = make_router(backend("a", max_parallel=1))
    running = placed(router.choose(LLAMA, "bursty", 0))
    burst = [waiting(router.choose(LLAMA, "bursty", 0)) for _ in range(50)]
    single = waiting(router.choose(LLAMA, "quiet", 1))
    router.release(running, 2)  # first release: the burst's turn (it was waiting first), its oldest request
    assert [t.state for t in (burst[0], burst[1], single)] == [TicketState.PLACED, TicketState.WAITING,
                                                                 TicketState.WAITING]
    router.release(placed(burst[0].outcome), 3)  # second release: the quiet user's turn
    assert isinstance(single.outcome, Placement), "served within 2 releases"
    assert all(t.state is TicketState.WAITING for t in burst[1:])


def test_users_take_turns_and_each_users_requests_keep_their_order() -> None:
    router = make_router(backend("a", max_parallel=1))
    running = placed(router.choose(None, "x", 0))
    tickets = [waiting(router.choose(None, user, 0)) for user in ["a", "a", "a", "b", "c", "c"]]
    order = []
    for step in range(len(tickets)):
        router.release(running, step + 1)
        ticket = next(t for t in tickets if t.state is TicketState.PLACED and t not in order)
        order.append(ticket)
        running = placed(ticket.outcome)
    assert [tickets.index(t) for t in order] == [0, 3, 4, 1, 5, 2]


def test_a_freed_slot_goes_to_the_first_waiter_that_may_run_there() -> None:
    router = make_router(backend("a", max_parallel=1), backend("b", max_parallel=1))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA, QWEN], 0)
    on_a = placed(router.choose(LLAMA, "u", 0))
    on_b = placed(router.choose(QWEN, "u", 0))
    assert (on_a.backend, on_b.backend) == ("a", "b")
    wants_qwen = waiting(router.choose(QWEN, "first", 1))
    wants_llama = waiting(router.choose(LLAMA, "second", 2))
    router.release(on_a, 3)  # a has no qwen: the llama waiter, though it came later
    assert wants_qwen.state is TicketState.WAITING and wants_llama.state is TicketState.PLACED


def test_cancel_leaves_the_queue_or_gives_back_the_slot() -> None:
    router = make_router(backend("a", max_parallel=1))
    running = placed(router.choose(LLAMA, "u", 0))
    gone = waiting(router.choose(LLAMA, "u", 0))
    granted = waiting(router.choose(LLAMA, "v", 0))
    after = waiting(router.choose(LLAMA, "w", 0))
    router.cancel(gone, 1)
    assert gone.outcome is Refusal.CANCELLED and router.queue_depth == 2
    router.release(running, 2)
    assert granted.state is TicketState.PLACED
    router.cancel(granted, 3)  # its client left before it ran: the slot passes on
    assert after.state is TicketState.PLACED


# ---------------------------------------------------------------------------------------------------------
# Rule 3: not found versus unavailable


def test_unknown_model_everywhere_is_not_found() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [QWEN], 0)
    router.set_inventory("b", [QWEN], 0)
    refusal = router.choose(LLAMA, "u", 1)
    assert refusal is Refusal.NOT_FOUND and refusal.status == 404 and not refusal.retry_after


def test_model_only_on_an_ejected_backend_is_unavailable() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [QWEN], 0)
    router.set_inventory("b", [QWEN, LLAMA], 0)
    eject(router, "b", 1)
    refusal = router.choose(LLAMA, "u", 3)
    assert refusal is Refusal.UNAVAILABLE and refusal.status == 503 and refusal.retry_after
    assert placed(router.choose(QWEN, "u", 3)).backend == "a"
    assert router.counters.unavailable == 1


def test_waiters_are_refused_when_their_only_backend_is_ejected() -> None:
    router = make_router(backend("a", max_parallel=1), backend("b"))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [QWEN], 0)
    placed(router.choose(LLAMA, "u", 0))
    ticket = waiting(router.choose(LLAMA, "u", 0))
    eject(router, "a", 1)
    assert ticket.outcome is Refusal.UNAVAILABLE and router.queue_depth == 0


def test_model_missing_forgets_it_there() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA], 0)
    router.model_missing("a", "llama3:8b", 1)
    assert {placed(router.choose(LLAMA, "u", 1)).backend for _ in range(20)} == {"b"}
    router.model_missing("b", LLAMA, 1)
    assert router.choose(LLAMA, "u", 1) is Refusal.NOT_FOUND


# ---------------------------------------------------------------------------------------------------------
# Rule 4: moves


def test_a_refused_connection_moves_the_request_and_ejects_the_backend() -> None:
    router = make_router(backend("a"), backend("b"), backend("c"))
    first = placed(router.choose(LLAMA, "u", 0))
    assert router.record_connection_error(first.backend, 0.1, refused=True) is HealthChange.EJECTED
    second = placed(router.move(first, 0.1, reason=MoveReason.CONNECT_REFUSED))
    assert second.backend != first.backend and second.moves == 1
    assert second.tried == (first.backend, second.backend) and first.released
    third = placed(router.move(second, 0.2, reason=MoveReason.BUSY))
    assert third.backend not in (first.backend, second.backend) and third.moves == 2
    assert router.move(third, 0.3, reason=MoveReason.BUSY) is Refusal.NO_MOVE  # at most MAX_MOVES
    assert MAX_MOVES == 2 and router.counters.moves == 2
    assert set(in_flight(router).values()) == {0}


def test_busy_moves_without_touching_health() -> None:
    router = make_router(backend("a"), backend("b"))
    first = placed(router.choose(LLAMA, "u", 0))
    moved = placed(router.move(first, 0, reason=MoveReason.BUSY))
    assert moved.backend != first.backend
    assert all(view.consecutive_failures == 0 and view.state == "up" for view in router.snapshot(0).backends)


def test_no_untried_candidate_is_no_move() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [QWEN], 0)
    first = placed(router.choose(LLAMA, "u", 0))
    refusal = router.move(first, 0, reason=MoveReason.CONNECT_FAILED)
    assert refusal is Refusal.NO_MOVE and refusal.status == 502


def test_a_move_to_full_backends_waits_and_excludes_the_one_it_left() -> None:
    router = make_router(backend("a", max_parallel=1), backend("b", max_parallel=1))
    first = placed(router.choose(LLAMA, "u", 0))
    other = placed(router.choose(LLAMA, "v", 0))
    ticket = waiting(router.move(first, 1, reason=MoveReason.BUSY))
    assert ticket.excluded == {first.backend}
    # first's slot is free now, but the moved request must not go back there
    assert ticket.state is TicketState.WAITING
    router.release(other, 2)
    assert isinstance(ticket.outcome, Placement) and ticket.outcome.backend == other.backend
    assert ticket.outcome.moves == 1


def test_pinned_requests_go_where_they_are_pinned_and_never_move() -> None:
    router = make_router(backend("a"), backend("b"))
    router.set_inventory("a", [QWEN], 0)
    router.set_inventory("b", [QWEN], 0)
    eject(router, "b", 0)
    pinned = placed(router.choose(LLAMA, "admin", 2, pin="b"))  # whatever its health or inventory
    assert pinned.backend == "b" and pinned.pinned
    assert router.move(pinned, 3, reason=MoveReason.BUSY) is Refusal.NO_MOVE
    refusal = router.choose(LLAMA, "admin", 2, pin="nope")
    assert refusal is Refusal.UNKNOWN_BACKEND and refusal.status == 400


def test_move_of_a_released_placement_is_a_bug() -> None:
    router = make_router(backend("a"), backend("b"))
    placement = placed(router.choose(None, "u", 0))
    router.release(placement, 1)
    with pytest.raises(ValueError):
        router.move(placement, 1, reason=MoveReason.BUSY)


# ---------------------------------------------------------------------------------------------------------
# Rule 5: health


def test_two_failed_probes_eject_and_two_successes_restore() -> None:
    router = make_router(backend("a"), backend("b"))
    assert router.record_probe("a", 0, ok=False) is None  # one failure is not enough
    assert spread(router, 0) == {"a", "b"}
    assert router.record_probe("a", 1, ok=False) is HealthChange.EJECTED
    assert spread(router, 1) == {"b"}
    assert router.record_probe("a", 2, ok=True) is None
    assert router.record_probe("a", 3, ok=True) is HealthChange.RESTORED
    assert spread(router, 3) == {"a", "b"}


def test_a_success_between_failures_starts_the_count_again() -> None:
    router = make_router(backend("a"), backend("b"))
    for now, ok in enumerate([False, True, False, True, False]):
        assert router.record_probe("a", now, ok=ok) is None


def test_a_refused_connection_ejects_at_once() -> None:
    router = make_router(backend("a"), backend("b"))
    assert router.record_connection_error("a", 0, refused=True) is HealthChange.EJECTED
    router2 = make_router(backend("a"), backend("b"))
    assert router2.record_probe("a", 0, ok=False, refused=True) is HealthChange.EJECTED
    router3 = make_router(backend("a"), backend("b"))
    assert router3.record_connection_error("a", 0, refused=False) is None  # a timeout counts as one failure


def test_restoring_waits_for_the_hold() -> None:
    health = Health()
    health.failure(0, refused=True)
    assert health.ejected_until == BASE_EJECTION_S
    assert health.success(0.5) is None and health.success(1.0) is None  # two successes, hold not over
    assert health.state is HealthState.EJECTED
    assert health.success(BASE_EJECTION_S) is HealthChange.RESTORED


def test_ejection_time_grows_for_a_backend_that_keeps_failing() -> None:
    health = Health()
    holds = []
    now = 0.0
    for _ in range(9):
        assert health.failure(now, refused=True) is HealthChange.EJECTED
        holds.append(health.ejected_until - now)
        now = health.ejected_until
        health.success(now)
        assert health.success(now) is HealthChange.RESTORED
        now += 10  # fails again soon after coming back
    assert holds[:4] == [BASE_EJECTION_S, 2 * BASE_EJECTION_S, 4 * BASE_EJECTION_S, 8 * BASE_EJECTION_S]
    assert holds[-1] == MAX_EJECTION_S and health.ejections == 9
    # up long enough: the next ejection is a first one again
    now += FORGET_EJECTIONS_AFTER_S
    health.failure(now, refused=True)
    assert health.ejected_until - now == BASE_EJECTION_S


def test_never_eject_every_backend_the_least_recently_failed_is_tried() -> None:
    router = make_router(backend("a"), backend("b"), backend("c"))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA], 0)
    router.set_inventory("c", [QWEN], 0)
    eject(router, "b", 10)  # last failure at 11
    eject(router, "a", 20)  # at 21
    assert router.healthy
    assert router.choose(LLAMA, "u", 22) is Refusal.UNAVAILABLE  # c is up: llama is only on down ones
    eject(router, "c", 30)
    assert not router.healthy  # /health says 503
    assert placed(router.choose(LLAMA, "u", 32)).backend == "b"  # of llama's holders, b failed longest ago
    assert spread(router, 32) == {"b"}  # of all
    assert router.usable_backends() == ["b"]
    router.record_connection_error("b", 33, refused=True)  # b failed again: now a is the oldest failure
    assert placed(router.choose(LLAMA, "u", 33)).backend == "a"
    assert router.usable_backends() == ["a"]
    states = {view.name: view.state for view in router.snapshot(33).backends}
    assert states == {"a": "last resort", "b": "ejected", "c": "ejected"}


def test_a_restored_backend_takes_waiters_at_once() -> None:
    router = make_router(backend("a", max_parallel=1), backend("b", max_parallel=1))
    eject(router, "b", 0)
    placed(router.choose(None, "u", 2))
    ticket = waiting(router.choose(None, "u", 2))
    router.record_probe("b", 3, ok=True)
    assert router.record_probe("b", 4, ok=True) is HealthChange.RESTORED
    assert isinstance(ticket.outcome, Placement) and ticket.outcome.backend == "b"


def test_observations_about_unknown_backends_are_ignored() -> None:
    router = make_router(backend("a"))
    assert router.record_probe("gone", 0, ok=False, refused=True) is None
    router.set_inventory("gone", [LLAMA], 0)
    router.set_loaded("gone", [LLAMA], 0)


# ---------------------------------------------------------------------------------------------------------
# Reload and observability


def test_reconfigure_keeps_state_and_applies_new_limits() -> None:
    router = make_router(backend("a", max_parallel=1), backend("b", max_parallel=1))
    router.set_inventory("a", [LLAMA], 0)
    router.set_inventory("b", [LLAMA], 0)
    on_b = placed(router.choose(LLAMA, "u", 0, pin="b"))
    placed(router.choose(LLAMA, "u", 0, pin="a"))
    general = waiting(router.choose(LLAMA, "u", 0))
    pinned_b = waiting(router.choose(LLAMA, "admin", 0, pin="b"))
    router.reconfigure([backend("a", max_parallel=2), backend("c")], RoutingConfig(), 1)
    assert isinstance(general.outcome, Placement) and general.outcome.backend in {"a", "c"}
    assert pinned_b.outcome is Refusal.UNKNOWN_BACKEND
    assert router.backend_names() == ["a", "c"]
    assert router.snapshot(1).backends[0].inventory_known  # kept
    router.release(on_b, 2)  # a placement on a removed backend still releases cleanly
    assert on_b.backend_state.in_flight == 0 and sum(in_flight(router).values()) == 2


def test_snapshot_shows_what_health_and_metrics_need() -> None:
    router = make_router(backend("a", max_parallel=1, host=98), backend("b", max_parallel=2, weight=2))
    router.set_inventory("a", [LLAMA, QWEN], 0)
    router.set_inventory("b", [QWEN], 0)
    router.set_loaded("a", ["llama3:8b"], 0)
    placed(router.choose(LLAMA, "u", 1))
    waiting(router.choose(LLAMA, "u", 1))
    router.record_probe("b", 1, ok=False)
    snapshot = router.snapshot(2)
    a, b = snapshot.backends
    assert (a.name, a.state, a.in_flight, a.slots_busy, a.max_parallel, a.waiting) == ("a", "up", 1, 1, 1, 1)
    assert a.loaded == ("llama3:8b",) and a.models == 2 and a.url == "http://10.0.0.98:11434"
    assert (b.state, b.waiting, b.weight, b.consecutive_failures, b.ejections) == ("up", 0, 2, 1, 0)
    assert snapshot.healthy == 2 and snapshot.queue_depth == 1 and snapshot.waiting_users == 1
    assert snapshot.counters.placed == 1 and snapshot.counters.queued == 1
    router.record_probe("b", 2, ok=False)
    b = router.snapshot(3).backends[1]
    assert (b.state, b.ejections, b.ejected_for_s) == ("ejected", 1, BASE_EJECTION_S - 1)
    assert "1/2 up" in repr(router)


# ---------------------------------------------------------------------------------------------------------
# The fair queue on its own


class Item:
    def __init__(self, user: str, deadline: float) -> None:
        self.user = user
        self.deadline = deadline

    def __repr__(self) -> str:
        return f"Item({self.user}, {self.deadline})"


def test_fair_queue_expires_earliest_first_and_skips_departed_items() -> None:
    queue: FairQueue[Item] = FairQueue()
    items = [Item("a", 5), Item("b", 3), Item("a", 3), Item("c", 9)]
    for item in items:
        queue.push(item)
    queue.served(items[1])
    assert queue.next_deadline() == 3
    assert queue.pop_expired(5) == [items[2], items[0]]
    assert len(queue) == 1 and queue.next_deadline() == 9
    with pytest.raises(ValueError):
        queue.push(items[3])


def test_fair_queue_heap_stays_small_under_steady_traffic() -> None:
    queue: FairQueue[Item] = FairQueue()
    for i in range(10_000):
        item = Item(f"user{i % 3}", 1e9)
        queue.push(item)
        queue.served(item)
    assert len(queue) == 0 and len(queue._deadlines) <= 200
