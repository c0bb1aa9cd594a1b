"""Real PostgreSQL servers for tests: the machine's own server (a fresh database per test, dropped after), or a
private cluster made with `initdb` in a temp directory on a free loopback port (when no server answers, and
for tests that must stop the server without disturbing anyone else).

As root (CI), `initdb` refuses to run, so the private cluster is made and run by the `postgres` system user
(`runuser`). With CI=true a missing PostgreSQL is a failure, never a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

ADMIN_URL_ENV = "FASTGATE_TEST_POSTGRES"  # an admin URL to use instead of the local server, if set
LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT_S = 60
RUN_AS = "postgres"  # the system user that owns a private cluster when the tests run as root


def unavailable(reason: str) -> None:
    """Skip on a developer's machine without PostgreSQL; fail loudly in CI (CI=true), where it must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"PostgreSQL is needed in CI: {reason}")
    pytest.skip(f"PostgreSQL not available: {reason}")


def pg_binary(name: str) -> str | None:
    """initdb / pg_ctl: on PATH, or where Debian installs them (the newest version there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


class PgServer:
    """A server tests may create databases on. `private` ones can also be stopped and started again."""

    def __init__(self, admin_url: str, *, datadir: str = "", root: str = "", port: int = 0) -> None:
        self.admin_url = admin_url
        self.datadir = datadir
        self.root = root
        self.port = port

    @property
    def private(self) -> bool:
        return bool(self.datadir)

    def url(self, dbname: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + dbname

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = "fastgate_test_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    # -- private clusters only --------------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = pg_binary("pg_ctl")
        assert pg_ctl is not None
        command = [pg_ctl, "-D", self.datadir, *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S + 10)
        if result.returncode != 0:
            log = Path(self.root, "log").read_text(errors="replace")[-2000:] if Path(self.root, "log").exists() else ""
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {result.stderr.strip()}\n{log}")

    def start(self) -> None:
        # fsync off: test data need not survive a power cut, and commits cost nothing then.
        self._pg_ctl("-l", os.path.join(self.root, "log"), "-w", "-t", str(START_TIMEOUT_S), "-o",
                     f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                     f"-c full_page_writes=off -c max_connections=100", "start")

    def stop(self) -> None:
        """Stop it as an operator (or a crash-restarting supervisor) would: every connection is cut."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def _processes(self) -> list[int]:
        postmaster = int(Path(self.datadir, "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()  # after "(comm)": state, ppid, ...
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> list[int]:
        """SIGSTOP the server and its backends: connections stay open and the kernel still acknowledges
        bytes, but nothing answers (a hung server, the case no TCP timeout catches). Returns what to thaw."""
        frozen = self._processes()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        return frozen

    @staticmethod
    def thaw(frozen: list[int]) -> None:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def destroy(self) -> None:
        try:
            self._pg_ctl("-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def private_cluster() -> PgServer:
    """initdb a cluster in a temp directory and start it on a free loopback port (a few seconds)."""
    initdb = pg_binary("initdb")
    if initdb is None or pg_binary("pg_ctl") is None:
        unavailable("initdb/pg_ctl not found (apt-get install postgresql)")
    assert initdb is not None
    root = tempfile.mkdtemp(prefix="fastgate-pg-")  # directly in /tmp: the postgres user must reach it
    command = [initdb, "-D", os.path.join(root, "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
               "--locale=C", "--no-sync"]
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(RUN_AS)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            unavailable(f"running as root and there is no {RUN_AS!r} user to run initdb as")
            raise
        os.chown(root, owner.pw_uid, owner.pw_gid)
        command = ["runuser", "-u", RUN_AS, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"initdb failed: {result.stderr.strip()[-500:]}")
    port = free_port()
    server = PgServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", datadir=os.path.join(root, "data"),
                      root=root, port=port)
    try:
        server.start()
    except RuntimeError as exc:
        server.destroy()
        unavailable(str(exc))
    return server


def any_server() -> tuple[PgServer, bool]:
    """The local server when it answers (trust auth as user postgres, or FASTGATE_TEST_POSTGRES), else a private
    cluster. Returns (server, made here: destroy it when done)."""
    url = os.environ.get(ADMIN_URL_ENV) or LOCAL_ADMIN_URL
    if _answers(url):
        return PgServer(url), False
    return private_cluster(), True
