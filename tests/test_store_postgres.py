"""The key and usage store in PostgreSQL (`[store] url`, issue 10), against a real server.

Each test gets a fresh database on the machine's PostgreSQL (dropped after), or on a private `initdb` cluster
when none answers (see tests/pg_server.py). The outage tests stop a private cluster of their own, or close
their own database to connections, so nobody else's database is disturbed. Several tests run three
`fastgate serve` processes sharing one database and spread requests across them.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fastgate.managed
from fastgate.config import build_config
from fastgate.errors import ConfigError
from fastgate.state.postgres_store import SCHEMA_VERSION, PostgresStore
from fastgate.state.stores import PG_SPILL_FILE, open_store, open_store_at, pg_spill_file, redacted_url
from fastgate.store import StoreError
from fastgate.usage import UsageRecord
from tests.conftest import KEY1, KEYS, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.pg_server import PgServer, any_server, private_cluster
from tests.proc import FastgateProcess, write_config
from tests.rawhttp import Client, RawResponse

pytestmark = pytest.mark.timeout(180)

NOW = 1_800_000_000.0
KILL_AFTER_S = 3.3  # when the SIGKILL test kills (its phase against the 1 s write rounds decides the loss)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server, mine = any_server()
    try:
        yield server
    finally:
        if mine:
            server.destroy()


@pytest.fixture
def db_url(pg: PgServer) -> Iterator[str]:
    url = pg.create_database()
    try:
        yield url
    finally:
        pg.drop_database(url)


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[PostgresStore]:
    with PostgresStore(db_url, spill_file=str(tmp_path / PG_SPILL_FILE)) as opened:
        yield opened


def row(n: int = 0, *, key_id: str = "", user: str = "alice", status: int = 200, tokens: int = 3) -> UsageRecord:
    return UsageRecord(NOW + n, user, key_id, "llama3.2", "/api/chat", status, tokens, 2 * tokens, 1.5, "gpu-a")


# ---------------------------------------------------------------------------------------------------------
# Config (pure)

def test_path_and_url_together_is_an_error_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"store\.path and store\.url"):
        build_config({"store": {"path": "keys.db", "url": "postgresql://db/fastgate"}})


@pytest.mark.parametrize("url", ["mysql://db/fastgate", "postgresql://db:99999/x", 5432, "http://u:pw@db/x"])
def test_bad_urls_name_the_key_and_never_the_password(url: object) -> None:
    with pytest.raises(ConfigError, match=r"^store\.url: ") as info:
        build_config({"store": {"url": url}})
    assert "pw" not in str(info.value)


def test_spill_file_goes_to_the_state_directory_under_systemd(tmp_path: Path) -> None:
    config = str(tmp_path / "etc" / "fastgate.toml")
    assert pg_spill_file(config, {}) == str(tmp_path / "etc" / PG_SPILL_FILE)
    assert pg_spill_file(config, {"STATE_DIRECTORY": "/var/lib/fastgate:/x"}) == "/var/lib/fastgate/" + PG_SPILL_FILE


def test_url_alone_is_accepted_and_redacted_for_messages() -> None:
    config = build_config({"store": {"url": "postgresql://fastgate:s3cret@db.internal:5433/fastgate?sslmode=require"}})
    assert config.store.url.endswith("sslmode=require") and config.store.path == ""
    assert redacted_url(config.store.url) == "postgresql://fastgate@db.internal:5433/fastgate"


# ---------------------------------------------------------------------------------------------------------
# The store itself

def test_keys_lifecycle_moves_the_revision(store: PostgresStore) -> None:
    start = store.change_token()
    record, secret = store.add("alice", role="admin", models=("llama3*",), rpm=10, tokens_per_day=1000, now=NOW)
    assert secret.startswith("fg_") and secret not in repr(store.list())
    assert store.change_token() == start + 1
    assert list(store.active_by_digest(NOW)) == [bytes.fromhex(record.digest)]
    rotated, new_secret = store.rotate(record.id, NOW + 1)
    assert new_secret != secret and rotated.digest != record.digest and rotated.rpm == 10
    assert store.change_token() == start + 2
    revoked = store.revoke(record.id, NOW + 2)
    assert revoked.revoked and store.active_by_digest(NOW + 3) == {}
    store.revoke(record.id, NOW + 4)  # again: nothing changes
    assert store.change_token() == start + 3
    with pytest.raises(StoreError, match="is revoked"):
        store.rotate(record.id, NOW)
    with pytest.raises(StoreError, match="no key with id"):
        store.revoke("k_missing0", NOW)
    assert [r.id for r in store.list()] == [] and [r.id for r in store.list(include_revoked=True)] == [record.id]
    digest = "ab" * 32
    (first, added), = store.import_digests([(digest, "", "carol")], role="admin", now=NOW)
    (again, added_again), = store.import_digests([(digest, "", "carol")], role="admin", now=NOW)
    assert added and not added_again and first.id == again.id


def test_usage_with_the_same_ids_counts_once(store: PostgresStore) -> None:
    record, _ = store.add("alice", now=NOW)
    rows = [row(i, key_id=record.id, status=200 if i % 3 else 500) for i in range(9)]
    ids = [f"inst-{i}" for i in range(9)]
    store.write_usage(rows, {record.id: NOW + 8}, ids=ids)
    store.write_usage(rows, {record.id: NOW + 2}, ids=ids)  # a retry after a commit whose answer was lost
    (summary,) = store.usage(by="key")
    assert (summary.group, summary.requests, summary.errors) == (record.id, 9, 3)
    assert (summary.prompt_tokens, summary.completion_tokens) == (27, 54)
    assert [s.group for s in store.usage(by="backend")] == ["gpu-a"]
    assert store.usage(since=NOW + 5, by="user")[0].requests == 4
    assert store.tokens_used_since(record.id, NOW + 6) == 3 * 9
    assert store.get(record.id).last_used_at == NOW + 8  # never moves backwards
    assert store.prune_usage(NOW + 4, limit=3) == 3 and store.prune_usage(NOW + 4) == 1
    assert store.usage()[0].requests == 5


def test_schema_is_created_once_by_concurrent_first_users(db_url: str, tmp_path: Path) -> None:
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(PostgresStore(db_url, spill_file=str(tmp_path / "s")))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(opened) == 4
    rows = opened[0]._query("SELECT version FROM fastgate_schema_version")
    assert rows == [(SCHEMA_VERSION,)]
    for s in opened:
        s.close()


def test_spill_file_is_imported_once(store: PostgresStore) -> None:
    store.spill([row(1), row(2)], ["a-1", "a-2"], {})
    store.spill([row(2)], ["a-2"], {})  # the same row saved twice (a retried stop)
    with open(store.spill_file, "a") as f:
        f.write('{"id": "a-3", "at": 1\n')  # cut short by a crash
    assert store.import_spill() == (2, 1)
    assert not Path(store.spill_file).exists()
    store.spill([row(1)], ["a-1"], {})  # already stored: an import adds nothing
    assert store.import_spill() == (0, 0)
    assert store.usage()[0].requests == 2


def test_notifications_wake_a_listener(store: PostgresStore, db_url: str, tmp_path: Path) -> None:
    assert store.wait_for_change(0.05)  # the first call subscribes: anything may have changed before
    assert not store.wait_for_change(0.05)
    with PostgresStore(db_url, spill_file=str(tmp_path / "other")) as other:
        other.write_usage([row()], {}, ids=["x"])  # usage is not a key change
        assert not store.wait_for_change(0.2)
        other.add("bob", now=NOW)
        assert store.wait_for_change(5.0)


def test_unreachable_server_is_one_clear_line(tmp_path: Path) -> None:
    from tests.pg_server import free_port
    with pytest.raises(StoreError) as info:
        open_store_at(url=f"postgresql://fastgate:hunter2@127.0.0.1:{free_port()}/fastgate",
                      spill_file=str(tmp_path / "s"))
    message = str(info.value)
    assert "cannot connect" in message and "\n" not in message and "hunter2" not in message


# ---------------------------------------------------------------------------------------------------------
# The CLI against PostgreSQL

def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgate", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_keys_and_usage(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "fastgate.toml"
    config.write_text(f'[store]\nurl = "{db_url}"\n\n[keys]\n"{KEY1}" = "ops"\n')
    added = cli(config, "keys", "add", "dana", "--models", "llama3*", "--rpm", "5", "--json")
    assert added.returncode == 0, added.stderr
    created = json.loads(added.stdout)
    listed = json.loads(cli(config, "keys", "list", "--json").stdout)
    assert [(k["id"], k["user"], k["models"], k["rpm"]) for k in listed] == [(created["id"], "dana", ["llama3*"], 5)]
    rotated = cli(config, "keys", "rotate", created["id"], "--json")
    assert rotated.returncode == 0 and json.loads(rotated.stdout)["key"] != created["key"]
    revoked = cli(config, "keys", "revoke", created["id"])
    assert revoked.returncode == 0 and "Revoked key" in revoked.stdout
    imported = cli(config, "keys", "import")
    assert imported.returncode == 0 and "Imported 1 of 1 keys" in imported.stdout
    with open_store(build_config({"store": {"url": db_url}})) as store:  # type: ignore[attr-defined]
        assert {r.user: r.revoked for r in store.list(include_revoked=True)} == {"dana": True, "ops": False}
        store.write_usage([row(1, user="dana"), row(2, user="ops")], {}, ids=["u1", "u2"])
    usage = json.loads(cli(config, "usage", "--json", "--by", "user").stdout)
    assert [(r["user"], r["requests"]) for r in usage["rows"]] == [("dana", 1), ("ops", 1)]
    assert cli(config, "usage", "prune", "--before", "2030-01-01").stdout.startswith("Deleted 2 usage rows")
    checked = cli(config, "check-config")
    assert checked.returncode == 0, checked.stderr


def test_cli_with_the_server_down_fails_in_one_line(tmp_path: Path) -> None:
    from tests.pg_server import free_port
    config = tmp_path / "fastgate.toml"
    config.write_text(f'[store]\nurl = "postgresql://fastgate:hunter2@127.0.0.1:{free_port()}/fastgate"\n')
    for args in (("keys", "list"), ("keys", "add", "erin"), ("usage",)):
        result = cli(config, *args)
        assert result.returncode == 1, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastgate: key store postgresql://fastgate@127.0.0.1:")
        assert "cannot connect" in lines[0] and "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_serve_with_the_database_down_exits_1_not_as_a_config_error(tmp_path: Path) -> None:
    """Status 2 means "config error, do not restart" to the systemd unit: a database that is down at start is
    worth retrying, so it is status 1 with one clear line."""
    from tests.pg_server import free_port
    config = write_config(tmp_path / "fastgate.toml", "http://127.0.0.1:9", keys=KEYS,
                          extra=f'[store]\nurl = "postgresql://fastgate:hunter2@127.0.0.1:{free_port()}/fastgate"\n')
    result = subprocess.run([sys.executable, "-m", "fastgate", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fastgate: key store postgresql://fastgate@127.0.0.1:") and "cannot connect" in last
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------------------
# In-process: the buffer's bound, with the database closed to connections

async def test_full_buffer_spills_then_drops_and_counts(make_gateway: MakeGateway, db_url: str, pg: PgServer,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the spill file of a config without a file lies in the working directory
    monkeypatch.setattr(fastgate.managed, "MAX_PENDING_ROWS", 20)
    gw = await make_gateway(store={"url": db_url}, auth={"max_failures": 0})
    dbname = db_url.rsplit("/", 1)[1]
    pg.admin(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
    pg.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{dbname}'")
    spill = tmp_path / PG_SPILL_FILE
    async with await Client.connect(gw.port) as c:
        for _ in range(50):
            assert (await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 200
        assert spill.exists() and len(spill.read_text().splitlines()) >= 30
        aside = tmp_path / "aside.jsonl"
        spill.rename(aside)
        spill.mkdir()  # now not even the spill file can be written
        for _ in range(10):
            assert (await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 200
        metrics = (await c.request("GET", "/metrics", headers={"X-API-Key": KEY1})).body.decode()
    dropped = int(next(line.split()[1] for line in metrics.splitlines()
                       if line.startswith("fastgate_usage_rows_dropped_total ")))
    assert dropped >= 2 and "fastgate_usage_rows_pending " in metrics
    spill.rmdir()
    aside.rename(spill)
    pg.admin(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
    with PostgresStore(db_url, spill_file=str(tmp_path / "unused")) as reader:
        # 60 recorded (/metrics is answered here, not recorded), less what was dropped: exactly that many.
        expected = 60 - dropped
        await eventually(lambda: total_requests(reader) == expected, timeout_s=15)
        assert not spill.exists()


# ---------------------------------------------------------------------------------------------------------
# Several fastgate processes sharing one database

async def eventually(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(check):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def total_requests(store: PostgresStore) -> int:
    return sum(s.requests for s in store.usage())


@dataclass
class Fleet:
    ollama: FakeOllama
    db_url: str
    root: Path
    procs: list[FastgateProcess | None] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)

    async def start(self, count: int) -> None:
        for i in range(count):
            folder = self.root / f"instance{i}"  # each instance its own folder, as on its own machine
            folder.mkdir()
            self.configs.append(write_config(folder / "fastgate.toml", self.ollama.url, keys=KEYS,
                                             extra=f'[store]\nurl = "{self.db_url}"\n\n[auth]\nmax_failures = 0\n'))
        self.procs = list(await asyncio.gather(*(FastgateProcess.start("serve", "--config", str(c))
                                                 for c in self.configs)))

    async def restart(self, i: int) -> None:
        self.procs[i] = await FastgateProcess.start("serve", "--config", str(self.configs[i]))

    def ports(self) -> list[int]:
        return [p.port for p in self.procs if p is not None]

    async def stop(self) -> None:
        for p in self.procs:
            if p is not None:
                await p.stop()


@pytest.fixture
async def fleet(ollama: FakeOllama, db_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(ollama, db_url, tmp_path)
    try:
        yield f
    finally:
        await f.stop()


async def status_on(port: int, secret: str) -> int:
    async with await Client.connect(port) as c:
        return (await c.request("GET", "/api/version", headers={"X-API-Key": secret}, timeout=5)).status


async def test_revoke_reaches_all_three_instances_within_a_second(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.start(3)
    with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "cli-spill")) as admin:
        record, secret = admin.add("frank", now=time.time())
        for port in fleet.ports():
            await eventually_async(lambda port=port: status_on(port, secret), 200)
        admin.revoke(record.id, time.time())
        revoked_at = time.monotonic()
        refused_after: dict[int, float] = {}
        while len(refused_after) < 3 and time.monotonic() - revoked_at < 5.0:
            statuses = await asyncio.gather(*(status_on(p, secret) for p in fleet.ports()))
            for port, status in zip(fleet.ports(), statuses):
                if status == 401:
                    refused_after.setdefault(port, time.monotonic() - revoked_at)
        print(f"revocation refused after (s): {sorted(round(v, 3) for v in refused_after.values())}")
        assert len(refused_after) == 3 and max(refused_after.values()) < 1.0
        # Rotation too: the old secret goes everywhere, the new one works everywhere.
        other, old_secret = admin.add("gina", now=time.time())
        for port in fleet.ports():
            await eventually_async(lambda port=port: status_on(port, old_secret), 200)
        _, new_secret = admin.rotate(other.id, time.time())
        for port in fleet.ports():
            await eventually_async(lambda port=port: status_on(port, new_secret), 200, timeout_s=1.0)
            assert await status_on(port, old_secret) == 401


async def eventually_async(probe, wanted: int, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (got := await probe()) != wanted:
        assert loop.time() < deadline, f"still {got}, wanted {wanted}"
        await asyncio.sleep(0.02)


MIXED = (
    ("POST", "/api/generate", {"model": "qwen2.5:0.5b", "prompt": "hi there", "stream": False}),
    ("POST", "/api/chat", {"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "hello"}]}),
    ("POST", "/api/embed", {"model": "qwen2.5:0.5b", "input": ["one", "two words"]}),
    ("POST", "/api/generate", {"model": "no-such-model", "prompt": "x", "stream": False}),  # 404 from Ollama
    ("GET", "/api/tags", None),
)


def tokens_in(response: RawResponse) -> int:
    """Prompt plus completion tokens Ollama reported in this answer (its last object that has them)."""
    if response.status != 200:
        return 0
    total = 0
    for line in response.body.decode().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if isinstance(obj, dict) and ("eval_count" in obj or "prompt_eval_count" in obj):
            total = int(obj.get("prompt_eval_count", 0)) + int(obj.get("eval_count", 0))
    return total


@dataclass
class Traffic:
    """Requests spread over instances by a few concurrent clients; every answer is counted once."""

    secret: str
    answered: int = 0
    tokens: int = 0
    done_at: list[float] = field(default_factory=list)  # monotonic time of each answer
    statuses: dict[int, int] = field(default_factory=dict)
    stopping: bool = False  # set to end the run after the requests in flight (cancelling would lose count)

    async def one(self, port: int, n: int) -> bool:
        method, path, body = MIXED[n % len(MIXED)]
        try:
            async with await Client.connect(port) as c:
                response = await c.request(method, path, headers={"X-API-Key": self.secret}, json_body=body,
                                           timeout=15)
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            return False  # refused or cut before an answer (an instance stopping): sent again elsewhere
        assert response.status in (200, 404), response.status
        self.answered += 1
        self.tokens += tokens_in(response)
        self.done_at.append(time.monotonic())
        self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        return True

    async def run(self, ports: list[int], count: int, *, workers: int = 8, pace_s: float = 0.0,
                  on_progress=None) -> None:  # type: ignore[no-untyped-def]
        counter = iter(range(count))
        rng = random.Random(7)

        async def worker() -> None:
            for n in counter:
                if self.stopping:
                    return
                if on_progress is not None:
                    await on_progress(n)
                while not await self.one(rng.choice(ports), n):
                    await asyncio.sleep(0.01)
                if pace_s:
                    await asyncio.sleep(pace_s)

        await asyncio.gather(*(worker() for _ in range(workers)))


async def settle_exact(store: PostgresStore, requests: int, tokens: int, timeout_s: float = 20.0) -> None:
    """Usage in the store reaches exactly what the clients were answered, and stays there (no late double)."""
    def exact() -> bool:
        summaries = store.usage()
        return sum(s.requests for s in summaries) == requests

    await eventually(exact, timeout_s)
    await asyncio.sleep(2.5)  # two more write rounds of every instance: nothing more may arrive
    summaries = store.usage()
    assert sum(s.requests for s in summaries) == requests
    assert sum(s.total_tokens for s in summaries) == tokens


async def test_usage_is_exact_with_an_instance_stopped_by_sigterm_half_way(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.start(3)
    with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "reader-spill")) as store:
        record, secret = store.add("hana", now=time.time())
        for port in fleet.ports():
            await eventually_async(lambda port=port: status_on(port, secret), 200)
        probes = 3  # the requests above are usage too
        traffic = Traffic(secret)
        ports = fleet.ports()
        stopped = asyncio.Event()
        victim = fleet.procs[0]
        assert victim is not None

        async def halfway(n: int) -> None:
            if n == 500 and not stopped.is_set():
                stopped.set()
                ports.remove(victim.port)  # new requests go to the other two; those in flight finish
                victim.signal(signal.SIGTERM)

        await traffic.run(ports, 1000, on_progress=halfway)
        assert await victim.wait() == 0
        assert traffic.answered == 1000 and traffic.statuses[404] == 200
        await settle_exact(store, 1000 + probes, traffic.tokens + 0)
        assert store.get(record.id).last_used_at is not None
    usage = await asyncio.to_thread(cli, fleet.configs[1], "usage", "--json")
    assert json.loads(usage.stdout)["rows"][0]["requests"] == 1000 + probes


async def test_sigkill_loses_at_most_the_last_second(fleet: Fleet, tmp_path: Path) -> None:
    """Measures what a SIGKILL costs: the rows recorded since the instance's last write round."""
    await fleet.start(1)
    proc = fleet.procs[0]
    assert proc is not None
    with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "reader-spill")) as store:
        _, secret = store.add("ivan", now=time.time())
        await eventually_async(lambda: status_on(proc.port, secret), 200)
        traffic = Traffic(secret)
        runner = asyncio.get_running_loop().create_task(traffic.run([proc.port], 100_000, workers=4))
        await asyncio.sleep(KILL_AFTER_S)  # steady traffic for a few write rounds, then the kill mid-round
        proc.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await proc.wait()
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
        answered = [t for t in traffic.done_at if t <= killed_at]
        stored = total_requests(store) - 1  # less the probe above
        missing = len(answered) - stored
        newest_lost = sorted(answered)[-missing:] if missing > 0 else []
        span = killed_at - newest_lost[0] if newest_lost else 0.0
        rate = len(answered) / KILL_AFTER_S
        print(f"SIGKILL: {len(answered)} answered, {stored} stored, {missing} missing "
              f"(the last {span:.2f} s of answers, at ~{rate:.0f} requests/s)")
        assert 0 <= missing  # never more rows than answers
        within = sum(1 for t in answered if t > killed_at - 1.5)  # one round (1 s) plus a write in progress
        assert missing <= within


async def test_usage_is_exact_after_postgres_is_stopped_for_20_seconds(ollama: FakeOllama, tmp_path: Path) -> None:
    """A private cluster, really stopped for 20 s under traffic: keys keep working, `fastgate keys` says the
    store is down in one line, an instance stopped meanwhile spills its rows and imports them on restart, and
    once the server is back the totals are exact."""
    server = private_cluster()
    fleet = Fleet(ollama, "", tmp_path)
    try:
        fleet.db_url = server.create_database()
        await fleet.start(2)
        with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "reader-spill")) as store:
            _, secret = store.add("judy", now=time.time())
            for port in fleet.ports():
                await eventually_async(lambda port=port: status_on(port, secret), 200)
        traffic = Traffic(secret)
        ports = fleet.ports()
        loop = asyncio.get_running_loop()
        runner = loop.create_task(traffic.run(ports, 100_000, workers=3, pace_s=0.02))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.stop)
        down_at = loop.time()
        before = traffic.answered
        listing = await asyncio.to_thread(cli, fleet.configs[0], "keys", "list")
        assert listing.returncode == 1 and len(listing.stderr.splitlines()) == 1, listing.stderr
        assert "cannot connect" in listing.stderr and "Traceback" not in listing.stderr
        await asyncio.sleep(10.0 - (loop.time() - down_at))
        second = fleet.procs[1]
        assert second is not None
        ports.remove(second.port)
        second.signal(signal.SIGTERM)
        assert await second.wait(30) == 0
        assert b"saved them to" in second.log, bytes(second.log).decode()[-2000:]
        assert (fleet.configs[1].parent / PG_SPILL_FILE).exists()
        fleet.procs[1] = None
        await asyncio.sleep(20.0 - (loop.time() - down_at))
        assert traffic.answered > before + 100  # served all along, from the keys loaded before
        await asyncio.to_thread(server.start)
        await asyncio.sleep(2.0)
        traffic.stopping = True
        await runner
        await fleet.restart(1)  # imports what it saved when it stopped
        with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "reader-spill")) as store:
            await settle_exact(store, traffic.answered + 2, traffic.tokens, timeout_s=30)
        assert not (fleet.configs[1].parent / PG_SPILL_FILE).exists()
    finally:
        await fleet.stop()
        server.destroy()


async def test_a_frozen_server_never_holds_up_requests_or_shutdown(ollama: FakeOllama, tmp_path: Path) -> None:
    """A server that accepts bytes but answers nothing: requests are served from the keys in memory, SIGTERM
    still ends the process (its stuck call is cut), the rows go to the spill file and, once the server is back,
    the restarted instance imports them: exact totals."""
    server = private_cluster()
    fleet = Fleet(ollama, "", tmp_path)
    frozen: list[int] = []
    try:
        fleet.db_url = server.create_database()
        await fleet.start(1)
        config = fleet.configs[0]
        config.write_text(config.read_text().replace("[server]\n", "[server]\nshutdown_grace = 2\n", 1))
        await fleet.procs[0].stop()  # type: ignore[union-attr]
        await fleet.restart(0)
        proc = fleet.procs[0]
        assert proc is not None
        with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "reader-spill")) as store:
            _, secret = store.add("kim", now=time.time())
        await eventually_async(lambda: status_on(proc.port, secret), 200)
        frozen = await asyncio.to_thread(server.freeze)
        traffic = Traffic(secret)
        await traffic.run([proc.port], 300, workers=3, pace_s=0.01)  # a few write rounds get stuck meanwhile
        assert traffic.answered == 300
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0
        assert b"saved them to" in proc.log, bytes(proc.log).decode()[-2000:]
        server.thaw(frozen)
        frozen = []
        await fleet.restart(0)
        with PostgresStore(fleet.db_url, spill_file=str(tmp_path / "reader-spill")) as store:
            await settle_exact(store, traffic.answered + 1, traffic.tokens, timeout_s=30)
    finally:
        server.thaw(frozen)
        await fleet.stop()
        server.destroy()
