"""[server] workers = N (issue 10): a supervisor and N worker processes on one address.

Process tests run `fastgate serve` with two workers, a private redis-server ([state], which workers > 1 needs)
and the fake Ollama, and tell the workers apart by the pid each log line carries. The pure parts (how
/metrics adds up, the restart backoff, the log tag) are tested with values.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from fastgate import metrics_sum
from fastgate.cli import main
from fastgate.config import Config, HostPort, build_config
from fastgate.errors import ConfigError
from fastgate.logs import log, setup_logging
from fastgate.metrics import BackendGauges, Histogram, Metrics
from fastgate.supervisor import RESTART_DELAY_MAX_S, RESTART_DELAY_MIN_S, pin_ports, restart_delay
from fastgate.worker import WorkerTag, tag_log_lines, untag_log_lines
from tests.conftest import KEY1, KEYS
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, free_port, write_config
from tests.rawhttp import Client, build_request
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(90)

NEW_KEY = "api-workers-new-key-77"
SERVED = re.compile(rb"\[pid (\d+)\] \[([0-9a-f]{8})\] Processing request: (\S+) (\S+)")
START = re.compile(rb"; pid (\d+);.*; (\d+) workers \(pids ([0-9, ]+)\)")
RUN_DIR = re.compile(rb"Workers share their metrics through (\S+)")
STARTED_1 = re.compile(rb"Worker 1 started \(pid (\d+)\)")
TAGS_200 = 'fastgate_requests_total{user="user1",path="/api/tags",status="200"}'
DEADLINE_S = 15.0


# ---------------------------------------------------------------------------------------------------------
# Config


def test_one_worker_is_the_default() -> None:
    assert Config().server.workers == 1
    assert build_config({}).server.workers == 1


@pytest.mark.parametrize("value", [0, -1, "2", 2.0, True])
def test_workers_must_be_an_integer_of_at_least_one(value: object) -> None:
    with pytest.raises(ConfigError, match=r"server\.workers: expected an integer >= 1"):
        build_config({"server": {"workers": value}, "state": {"url": "redis://127.0.0.1:6379/0"}})


def test_more_than_one_worker_needs_state_and_the_error_names_both_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"server": {"workers": 2}})
    assert str(caught.value).startswith("server.workers: more than 1 needs [state] url")
    assert "state.url" in str(caught.value)
    config = build_config({"server": {"workers": 3}, "state": {"url": "redis://127.0.0.1:6379/0"}})
    assert config.server.workers == 3


def test_serve_refuses_workers_without_state_with_exit_2(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fastgate.toml"
    path.write_text("[server]\nworkers = 2\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "server.workers: more than 1 needs [state] url" in err and "state.url" in err


def test_ports_chosen_by_the_kernel_are_pinned_for_every_worker() -> None:
    config = build_config({"server": {"listen": "127.0.0.1:0"}, "metrics": {"listen": "127.0.0.1:0"}})
    pinned = pin_ports(config, HostPort("127.0.0.1", 4321), HostPort("127.0.0.1", 4322))
    assert pinned.server.listen == HostPort("127.0.0.1", 4321)
    assert pinned.metrics.listen == HostPort("127.0.0.1", 4322)
    fixed = build_config({"server": {"listen": "127.0.0.1:8000"}})
    assert pin_ports(fixed, HostPort("127.0.0.1", 8000), None) == fixed


# ---------------------------------------------------------------------------------------------------------
# Restart backoff (pure)


def test_restart_backoff_doubles_from_immediate_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == 0.0  # the first death: replaced at once
    assert delays[1] == RESTART_DELAY_MIN_S
    assert delays[2] == 2 * RESTART_DELAY_MIN_S and delays[3] == 4 * RESTART_DELAY_MIN_S
    assert delays == sorted(delays) and delays[-1] == RESTART_DELAY_MAX_S


# ---------------------------------------------------------------------------------------------------------
# Totals across workers (pure)


def worker_metrics(user: str, requests: int, tokens: int, seconds: float) -> Metrics:
    metrics = Metrics()
    for _ in range(requests):
        metrics.request(user, "/api/chat", 200)
        metrics.request_duration.observe(seconds)
    metrics.add_tokens(user, "llama3.2", tokens, tokens * 2)
    metrics.auth_failure("unknown_key")
    metrics.upstream_up = 1
    return metrics


def test_snapshots_add_up_counters_histograms_and_gauges() -> None:
    one = metrics_sum.snapshot(worker_metrics("alice", 3, 10, 0.02), metrics_sum.Gauges(
        in_flight=2, connections=5, buffered_bytes=100, buffer_refusals=1,
        backends=[BackendGauges("gpu1", True, 2, 1, 0), BackendGauges("gpu2", False, 0, 0, 3)], queue_depth=1))
    two_metrics = worker_metrics("alice", 4, 5, 2.0)
    two_metrics.request("bob", "/api/tags", 401)
    two_metrics.upstream_up = 0
    two = metrics_sum.snapshot(two_metrics, metrics_sum.Gauges(
        in_flight=1, connections=3, buffered_bytes=50, buffer_refusals=2,
        backends=[BackendGauges("gpu1", False, 1, 0, 1), BackendGauges("gpu2", False, 0, 2, 0)], queue_depth=2))
    total, gauges = metrics_sum.merge([json.loads(json.dumps(one)), json.loads(json.dumps(two))])  # as sent
    assert total.requests == {("alice", "/api/chat", "200"): 7, ("bob", "/api/tags", "401"): 1}
    assert total.tokens == {("alice", "llama3.2", "prompt"): 15, ("alice", "llama3.2", "completion"): 30}
    assert total.auth_failures == {"unknown_key": 2}
    assert total.request_duration.count == 7 and total.request_duration.total == pytest.approx(3 * 0.02 + 4 * 2.0)
    assert sum(total.request_duration.counts) == 7
    assert total.upstream_up == 1  # one worker reached Ollama last
    assert (gauges.in_flight, gauges.connections, gauges.buffered_bytes, gauges.buffer_refusals) == (3, 8, 150, 3)
    assert gauges.backends == [BackendGauges("gpu1", True, 3, 1, 1), BackendGauges("gpu2", False, 0, 2, 3)]
    assert gauges.queue_depth == 3
    text = total.render(**gauges.render_args()).decode()
    assert 'fastgate_requests_total{user="alice",path="/api/chat",status="200"} 7' in text
    assert "fastgate_request_duration_seconds_count 7" in text


def test_state_shared_is_degraded_when_any_worker_is() -> None:
    shared, degraded, without = Metrics(), Metrics(), Metrics()
    shared.state_shared, degraded.state_shared = 1, 0
    snap = [metrics_sum.snapshot(m, metrics_sum.Gauges()) for m in (shared, degraded, without)]
    assert metrics_sum.merge(snap[:1] + snap[2:])[0].state_shared == 1
    assert metrics_sum.merge(snap)[0].state_shared == 0
    assert metrics_sum.merge(snap[2:])[0].state_shared == -1  # no [state]: the family stays hidden


def test_every_metrics_attribute_travels_in_the_snapshot() -> None:
    """A number added to Metrics later must be summed across workers too, not silently dropped."""
    metrics = worker_metrics("alice", 2, 3, 0.5)  # every dict and a histogram hold something
    metrics.upstream_head.observe(0.01)
    for name, value in vars(metrics).items():
        if type(value) is int:
            setattr(metrics, name, 7)
    merged, _ = metrics_sum.merge([metrics_sum.snapshot(metrics, metrics_sum.Gauges())])
    for name, value in vars(metrics).items():
        if name.startswith("_"):
            continue  # the model-label cap's own bookkeeping
        got = getattr(merged, name)
        if isinstance(value, Histogram):
            assert (got.counts, got.total, got.count) == (value.counts, value.total, value.count), name
        else:
            assert type(value) in (int, dict), f"{name}: a {type(value).__name__} the snapshot does not know"
            assert got == value, name


def test_a_dead_workers_counts_stay_and_are_never_counted_twice() -> None:
    alive = metrics_sum.snapshot(worker_metrics("alice", 2, 0, 0.1), metrics_sum.Gauges(connections=4))
    dead = metrics_sum.snapshot(worker_metrics("alice", 5, 0, 0.1), metrics_sum.Gauges(connections=9, in_flight=3))
    own = metrics_sum.snapshot(Metrics(), metrics_sum.Gauges(connections=1))
    retired = metrics_sum.fold(metrics_sum.Retired(), "2.2", dead)
    assert retired.absorbed == ["2.2"] and retired.exits == 1
    assert metrics_sum.fold(retired, "2.2", dead) is retired  # folded once only
    # A scrape that still found the dead worker's file skips it: the retired snapshot holds its counts.
    metrics, gauges, counted = metrics_sum.total(own, [("1.1", alive), ("2.2", dead)], retired)
    assert metrics.requests == {("alice", "/api/chat", "200"): 7}
    assert counted == 2
    assert gauges.connections == 5 and gauges.in_flight == 0  # its connections went with it
    again = metrics_sum.Retired.from_json(json.loads(json.dumps(retired.to_json())))
    assert again == retired


def test_bad_snapshots_are_refused() -> None:
    for bad in ({"v": 99}, [1, 2], "text", None):
        with pytest.raises(ValueError):
            metrics_sum.merge([bad])  # type: ignore[list-item]
    good = metrics_sum.empty_snapshot()
    good["request_duration"] = {"counts": [1], "total": 0.0, "count": 1}
    with pytest.raises(ValueError):
        metrics_sum.merge([good])


# ---------------------------------------------------------------------------------------------------------
# Log lines name the worker


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    saved = (list(log.handlers), log.level, log.propagate, list(log.filters))
    stream = io.StringIO()
    try:
        yield stream
    finally:
        log.handlers[:], log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])
        log.filters[:] = saved[3]


def test_text_lines_keep_the_seed_fields_and_gain_the_pid(captured_log: io.StringIO) -> None:
    setup_logging("INFO", captured_log)
    log.info("[%s] Processing request: %s %s", "a1b2c3d4", "GET", "api/tags")
    tag_log_lines(4242)
    tag_log_lines(4243)  # a worker forked from a tagged supervisor: one tag, its own
    log.info("[%s] Processing request: %s %s", "a1b2c3d4", "GET", "api/tags")
    untag_log_lines()
    before, after = captured_log.getvalue().splitlines()
    assert before.split(" - ", 2)[2] == "[a1b2c3d4] Processing request: GET api/tags"
    assert after.split(" - ", 2)[2] == "[pid 4243] [a1b2c3d4] Processing request: GET api/tags"
    assert after.split(" - ")[1] == "INFO"


def test_json_lines_gain_a_pid_field_and_keep_their_message(captured_log: io.StringIO) -> None:
    setup_logging("INFO", captured_log, fmt="json")
    log.addFilter(WorkerTag(4242))
    log.info("[%s] Answered %d", "a1b2c3d4", 200, extra={"fields": {"request_id": "a1b2c3d4", "status": 200}})
    log.info("Reloaded")
    first, second = (json.loads(line) for line in captured_log.getvalue().splitlines())
    assert first["pid"] == 4242 and first["msg"] == "[a1b2c3d4] Answered 200" and first["status"] == 200
    assert second["pid"] == 4242 and second["msg"] == "Reloaded"


# ---------------------------------------------------------------------------------------------------------
# Processes


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server())
    server.start()
    try:
        yield server
    finally:
        server.close()


def workers_config(tmp_path: Path, ollama: FakeOllama, redis: RedisServer, *, keys: dict[str, str] | None = None,
                   workers: int = 2, server_extra: str = "", extra: str = "", port: int | None = None) -> Path:
    path = write_config(tmp_path / "fastgate.toml", ollama.url, keys=keys or KEYS, port=port,
                        extra=f'[state]\nurl = "{redis.url}"\n\n{extra}')
    path.write_text(path.read_text().replace(
        "[server]\n", f'[server]\nworkers = {workers}\npid_file = "fastgate.pid"\nshutdown_grace = 10.0\n'
                      f"{server_extra}", 1))
    path.chmod(0o600)
    return path


class Workers:
    """The parent's pid and its workers' pids, read from the start line."""

    def __init__(self, proc: FastgateProcess) -> None:
        match = START.search(bytes(proc.log))
        assert match is not None, bytes(proc.log).decode(errors="replace")
        self.proc = proc
        self.parent = int(match.group(1))
        self.pids = [int(pid) for pid in match.group(3).split(b", ")]
        assert int(match.group(2)) == len(self.pids)

    def served_by(self, method: bytes = b"GET", path: bytes = b"api/tags") -> dict[int, int]:
        counts: dict[int, int] = {}
        for pid, _, m, p in SERVED.findall(bytes(self.proc.log)):
            if m == method and p == path:
                counts[int(pid)] = counts.get(int(pid), 0) + 1
        return counts

    async def run_dir(self) -> Path:
        await wait_for(lambda: RUN_DIR.search(bytes(self.proc.log)), "the run directory's line")
        return Path(RUN_DIR.search(bytes(self.proc.log)).group(1).decode())  # type: ignore[union-attr]


async def wait_for(condition: object, what: str, timeout: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def get(port: int, path: str, key: str = KEY1, *, ssl_context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One request on a connection of its own (the kernel picks a worker per connection)."""
    async with await Client.connect(port, ssl=ssl_context, server_hostname="127.0.0.1" if ssl_context else None) as c:
        resp = await c.request("GET", path, headers={"X-API-Key": key} if key else {})
        return resp.status, resp.body


def metric(text: bytes, series: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state != "Z"


async def test_one_worker_is_one_process_as_before(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys=KEYS)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        assert (await get(proc.port, "/api/tags"))[0] == 200
        assert children_of(proc.pid) == set()
    finally:
        assert await proc.stop() == 0
    text = bytes(proc.log)
    assert b"[pid " not in text and b"workers (pids" not in text
    assert f"; pid {proc.pid};".encode() in text


async def test_both_workers_serve_and_metrics_totals_match_the_requests(
        tmp_path: Path, ollama: FakeOllama, redis: RedisServer) -> None:
    metrics_port = free_port()
    config = workers_config(tmp_path, ollama, redis, extra=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        workers = Workers(proc)
        assert workers.parent == proc.pid and len(set(workers.pids)) == 2
        assert children_of(proc.pid) == set(workers.pids)
        assert (tmp_path / "fastgate.pid").read_text().strip() == str(proc.pid)  # the supervisor's
        sent = 40
        for _ in range(sent):
            assert (await get(proc.port, "/api/tags"))[0] == 200
        tokens = 0
        for i in range(6):
            async with await Client.connect(proc.port) as c:
                resp = await c.request("POST", "/api/chat", headers={"X-API-Key": KEY1}, json_body={
                    "model": "llama3.2:latest", "messages": [{"role": "user", "content": f"hi {i}"}],
                    "stream": False})
                assert resp.status == 200
                tokens += resp.json()["eval_count"]
        await wait_for(lambda: sum(workers.served_by().values()) == sent, "the request lines")
        served = workers.served_by()
        assert set(served) == set(workers.pids), served  # both workers took connections
        # Each scrape lands on either worker; every one gives the totals of both.
        answered_by = set()
        for _ in range(6):
            lines_before = len(SERVED.findall(bytes(proc.log)))
            status, body = await get(proc.port, "/metrics")
            assert status == 200
            assert metric(body, TAGS_200) == sent
            assert metric(body, 'fastgate_tokens_total{user="user1",model="llama3.2:latest",kind="completion"}') \
                == tokens
            assert metric(body, 'fastgate_workers{source="live"}') == 2
            await wait_for(lambda n=lines_before: len(SERVED.findall(bytes(proc.log))) > n, "the scrape's line")
            answered_by.add(int(SERVED.findall(bytes(proc.log))[-1][0]))
        for _ in range(4):  # the [metrics] listener is shared too, and needs no key
            status, body = await get(metrics_port, "/metrics", key="")
            assert status == 200 and metric(body, TAGS_200) == sent
        assert answered_by <= set(workers.pids)
    finally:
        assert await proc.stop() == 0
    assert not any(alive(pid) for pid in workers.pids)
    assert not (tmp_path / "fastgate.pid").exists()


async def test_sighup_reaches_every_worker(tmp_path: Path, ollama: FakeOllama, redis: RedisServer,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = workers_config(tmp_path, ollama, redis, keys={KEY1: "user1"})
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        workers = Workers(proc)
        for _ in range(6):
            assert (await get(proc.port, "/api/tags", NEW_KEY))[0] == 401
        # A new key, and JSON logs: each worker's "Reloaded" line is then JSON with its pid.
        config.write_text(config.read_text().replace("[keys]\n", '[log]\nformat = "json"\n\n[keys]\n') +
                          f'"{NEW_KEY}" = "carol"\n')
        assert main(["reload", "--config", str(config)]) == 0  # SIGHUP to the pid file's pid: the supervisor's

        def reloaded() -> set[int]:
            pids = set()
            for line in bytes(proc.log).splitlines():
                if line.startswith(b"{"):
                    record = json.loads(line)
                    if record["msg"].startswith("Reloaded"):
                        pids.add(record["pid"])
            return pids
        await wait_for(lambda: reloaded() == set(workers.pids), "a Reloaded line from each worker")
        for _ in range(20):  # connections spread over both workers: each one knows the new key
            assert (await get(proc.port, "/api/tags", NEW_KEY))[0] == 200
        lines = [json.loads(line) for line in bytes(proc.log).splitlines() if line.startswith(b"{")]
        carol = {record["pid"] for record in lines if record.get("user") == "carol"}
        assert carol == set(workers.pids)
        assert proc.proc.returncode is None and children_of(proc.pid) == set(workers.pids)  # nobody restarted
        assert f"Sent SIGHUP to fastgate (pid {proc.pid})" in capsys.readouterr().out
    finally:
        assert await proc.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_drains_every_worker(tmp_path: Path, ollama: FakeOllama, redis: RedisServer,
                                           sig: signal.Signals) -> None:
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    clients: list[Client] = []
    try:
        workers = Workers(proc)
        heads = []
        # Streams until each worker runs at least one (the kernel picks the worker by the client's port).
        while len(workers.served_by(b"POST", b"api/generate")) < 2:
            assert len(clients) < 40, workers.served_by(b"POST", b"api/generate")
            c = await Client.connect(proc.port)
            clients.append(c)
            c.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1}, body=json.dumps(
                {"model": "llama3.2:latest", "prompt": "hi",
                 "options": {"num_predict": 15, "fake_gap_ms": 100}}).encode()))
            heads.append(await c.response_head())
            assert heads[-1].status == 200
            started = len(clients)
            await wait_for(lambda n=started: sum(workers.served_by(b"POST", b"api/generate").values()) == n,
                           "the stream's request line")
        proc.signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:  # new connections are refused once both workers closed their listeners
            try:
                probe = await Client.connect(proc.port)
            except OSError:
                break
            await probe.close()
            assert loop.time() < deadline, "still accepting connections after SIGTERM"
            await asyncio.sleep(0.02)
        for c, head in zip(clients, heads):  # every stream in flight finishes whole
            rest = await c.body(head)
            assert rest.complete and rest.lines[-1]["done"] is True
            assert len(rest.lines) == 16
        assert await proc.wait(timeout=20) == 0
    finally:
        for c in clients:
            await c.close()
        await proc.stop()
    assert not any(alive(pid) for pid in workers.pids)
    text = bytes(proc.log)
    for pid in workers.pids:
        assert f"[pid {pid}] Stopped".encode() in text


async def test_a_killed_worker_is_replaced_and_its_counts_stay(tmp_path: Path, ollama: FakeOllama,
                                                               redis: RedisServer) -> None:
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        workers = Workers(proc)
        run_dir = await workers.run_dir()
        sent = 30
        for _ in range(sent):
            assert (await get(proc.port, "/api/tags"))[0] == 200

        def in_snapshot_files() -> int:
            total = 0
            for path in run_dir.glob("w-*.json"):
                try:
                    snap = json.loads(path.read_text())
                except (OSError, ValueError):
                    return -1
                total += sum(n for user, p, status, n in snap["requests"]
                             if (user, p, status) == ("user1", "/api/tags", "200"))
            return total
        # Each worker writes its snapshot once a second: wait until both files hold every request, so that
        # SIGKILL takes nothing with it (what a worker counted in its last second is lost otherwise).
        await wait_for(lambda: in_snapshot_files() == sent, "the snapshot files")
        victim, survivor = workers.pids
        os.kill(victim, signal.SIGKILL)
        died = re.compile(rb"Worker (\d) \(pid %d\) was killed by SIGKILL after serving" % victim)
        await wait_for(lambda: died.search(bytes(proc.log)), "the supervisor to see the death")
        slot = int(died.search(bytes(proc.log)).group(1))  # type: ignore[union-attr]
        during = 10
        for _ in range(during):  # the other worker serves meanwhile
            assert (await get(proc.port, "/api/tags"))[0] == 200
        started = re.compile(rb"Worker %d started \(pid (\d+)\)" % slot)
        await wait_for(lambda: started.search(bytes(proc.log)), "a replacement")
        new = int(started.search(bytes(proc.log)).group(1))  # type: ignore[union-attr]
        assert new not in workers.pids
        serving = b"[pid %d] Worker %d of 2 serving" % (new, slot)
        await wait_for(lambda: serving in bytes(proc.log), "the replacement to serve")
        assert children_of(proc.pid) == {survivor, new}
        after = 0
        while new not in workers.served_by():  # until the kernel hands the replacement a connection
            assert after < 60
            assert (await get(proc.port, "/api/tags"))[0] == 200
            after += 1
        status, body = await get(proc.port, "/metrics")
        assert status == 200
        assert metric(body, TAGS_200) == sent + during + after  # the dead worker's counts included
        assert metric(body, "fastgate_worker_exits_total") == 1
        assert metric(body, 'fastgate_workers{source="live"}') == 2
    finally:
        assert await proc.stop() == 0


def run_serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgate", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_workers_that_cannot_start_make_the_supervisor_exit_non_zero(tmp_path: Path, redis: RedisServer) -> None:
    config = tmp_path / "fastgate.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\nworkers = 2\npid_file = "fastgate.pid"\n\n'
                      f'[upstream]\nurl = "http://127.0.0.1:1"\n\n[state]\nurl = "{redis.url}"\n\n'
                      f'[store]\npath = "no/such/directory/keys.db"\n')
    result = run_serve(config)
    assert result.returncode == 2, result.stderr
    assert "fastgate: config error: store.path:" in result.stderr
    assert not (tmp_path / "fastgate.pid").exists()


def test_an_address_in_use_is_refused_before_any_worker_starts(tmp_path: Path, redis: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "fastgate.toml"
        config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n\n'
                          f'[upstream]\nurl = "http://127.0.0.1:1"\n\n[state]\nurl = "{redis.url}"\n')
        result = run_serve(config)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Worker" not in result.stderr


async def test_the_tls_listener_is_shared_by_the_workers(tmp_path: Path, ollama: FakeOllama,
                                                         redis: RedisServer) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "fastgate.crt", tmp_path / "fastgate.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    config = workers_config(tmp_path, ollama, redis,
                            server_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        workers = Workers(proc)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        for _ in range(30):
            assert (await get(proc.port, "/api/tags", ssl_context=context))[0] == 200
        await wait_for(lambda: sum(workers.served_by().values()) == 30, "the request lines")
        assert set(workers.served_by()) == set(workers.pids)
    finally:
        assert await proc.stop() == 0


async def test_a_worker_that_keeps_dying_is_replaced_ever_later(tmp_path: Path, ollama: FakeOllama,
                                                                redis: RedisServer) -> None:
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        workers = Workers(proc)
        pid, survivor = workers.pids  # in slot order: worker 1, worker 2
        waits = []
        for round_ in range(1, 4):
            os.kill(pid, signal.SIGKILL)
            died = re.compile(rb"Worker 1 \(pid %d\) was killed by SIGKILL after serving [0-9.]+ s; a new one "
                              rb"starts (now|in [0-9.]+ s)" % pid)
            await wait_for(lambda d=died: d.search(bytes(proc.log)), f"death {round_}")
            waits.append(died.search(bytes(proc.log)).group(1).decode())  # type: ignore[union-attr]
            await wait_for(lambda n=round_: len(STARTED_1.findall(bytes(proc.log))) == n, f"replacement {round_}")
            pid = int(STARTED_1.findall(bytes(proc.log))[-1])
            await wait_for(lambda p=pid: b"[pid %d] Worker 1 of 2 serving" % p in bytes(proc.log), "it to serve")
            assert (await get(proc.port, "/api/tags"))[0] == 200
        # Replaced at once the first time; dying again within 30 s of starting doubles the wait each time.
        assert waits == ["now", "in 0.25 s", "in 0.5 s"]
        assert children_of(proc.pid) == {survivor, pid}
    finally:
        assert await proc.stop() == 0


async def test_workers_drain_and_end_when_the_supervisor_is_killed(tmp_path: Path, ollama: FakeOllama,
                                                                   redis: RedisServer) -> None:
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    workers = Workers(proc)
    run_dir = await workers.run_dir()
    proc.signal(signal.SIGKILL)
    await wait_for(lambda: not any(alive(pid) for pid in workers.pids), "the orphaned workers to end")
    assert not run_dir.exists()  # the last of them removed what the supervisor could not
    assert await proc.wait() == -signal.SIGKILL
    text = bytes(proc.log)
    for pid in workers.pids:  # the parent-death signal is SIGTERM: each drained and stopped, none serves on
        assert b"[pid %d] Shutting down" % pid in text and b"[pid %d] Stopped" % pid in text


async def test_a_worker_too_busy_to_answer_is_counted_from_its_file(tmp_path: Path, ollama: FakeOllama,
                                                                   redis: RedisServer) -> None:
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    frozen = 0
    try:
        workers = Workers(proc)
        run_dir = await workers.run_dir()
        sent = 20
        for _ in range(sent):
            assert (await get(proc.port, "/api/tags"))[0] == 200
        await wait_for(lambda: sum(workers.served_by().values()) == sent, "the request lines")
        frozen = workers.pids[0]  # worker 1, whose id in the run directory is 1.1 (slot 1, first start)
        # Its snapshot file is current once it holds what the log says this worker served.
        count = workers.served_by()[frozen]
        await wait_for(lambda: f'"user1","/api/tags","200",{count}]' in (run_dir / "w-1.1.json").read_text(),
                       "the frozen worker's file")
        os.kill(frozen, signal.SIGSTOP)  # alive, listening, answering nobody: the scrape must not wait on it
        loop = asyncio.get_running_loop()
        for _ in range(20):  # a connection the kernel hands the frozen worker hangs: try another
            try:
                started = loop.time()
                status, body = await asyncio.wait_for(get(proc.port, "/metrics"), 3)
                break
            except asyncio.TimeoutError:
                continue
        else:
            raise AssertionError("no scrape reached the running worker")
        assert status == 200 and loop.time() - started < 2.5
        assert metric(body, TAGS_200) == sent
        assert metric(body, 'fastgate_workers{source="live"}') == 1
        assert metric(body, 'fastgate_workers{source="file"}') == 1
    finally:
        if frozen:
            os.kill(frozen, signal.SIGCONT)
        assert await proc.stop() == 0
