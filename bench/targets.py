"""The things measured: `direct` (the fake Ollama itself, the floor), `fastgate`, `nginx` and `seed`,
and on request `fastgate-limited` (fastgate serving a managed key from its SQLite key store, with limits,
a model allow-list and usage accounting on), `fastgate-redis` (the same with [state] in a redis-server of
the run's own), `fastgate-3backends` (three [[backends]], each its own fake Ollama with the model) and
`fastgate-workers2` ([server] workers = 2 with [state]; `fastgate-workers1` is the same with workers = 1),
and `floor` (bench/floor.py: the design card's bare minimum, the floor of fastgate's design, where `direct` is
the floor of any proxy; it logs nothing and checks no key).

Each proxy is started by the harness as its own process on loopback, with a config generated here,
and stopped by PID. All of them but `floor` log one line (fastgate: three) per request to a file in the run
directory, at their default level: fastgate at INFO, nginx's access log, the seed's INFO line.
Each target says which API key the client sends it (`Target.key`): the config-file key, or for
`fastgate-limited` the managed key created in the store before fastgate starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from .procs import Managed, free_port, spawn, wait_port

HOST = "127.0.0.1"
API_KEY = "bench-key-0123456789abcdef"
API_USER = "bench"
BAD_KEY = "bench-key-wrong"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_TARGETS = ("direct", "fastgate", "nginx", "seed")  # the default set
# Targets measured only when named in --targets.
EXTRA_TARGETS = ("fastgate-limited", "fastgate-redis", "fastgate-3backends", "fastgate-workers1", "fastgate-workers2",
                 "floor")
KNOWN_TARGETS = ALL_TARGETS + EXTRA_TARGETS
# Interleaving order: each variant of fastgate right after what it is compared with, so that the two are
# measured seconds apart.
TARGET_ORDER = ("direct", "fastgate", "fastgate-3backends", "fastgate-workers1", "fastgate-workers2",
                "fastgate-limited", "fastgate-redis", "floor", "nginx", "seed")
PROXIES = TARGET_ORDER[1:]
# Targets that refuse no key (the auth phase's wrong-key answers are not a failure of theirs).
KEYLESS_TARGETS = ("floor",)
BACKENDS = 3  # fastgate-3backends: fake Ollamas, each with the model, each its own process
WORKERS = 2  # fastgate-workers2: [server] workers
REDIS_STARTUP_S = 10.0

# fastgate-limited: a managed key of role `user` whose limits are high enough never to trigger in a run,
# but are all set, so every request goes through the rpm bucket, the in-flight count and the daily token
# check, and the model allow-list makes the gate buffer and parse the JSON body of inference requests.
# The bench's streams ask for model "llama3.2" (bench/client.py).
MANAGED_USER = "bench-limited"
MANAGED_MODELS = ("llama3*",)
MANAGED_LIMITS = {"rpm": 10_000_000, "max_concurrent": 10_000, "tokens_per_day": 10**12}
DENIED_MODEL = "mistral"  # a model the allow-list refuses (403), checked in the auth phase


@dataclass
class Target:
    name: str
    port: int
    process: Managed | None = None  # None for direct
    key: str = API_KEY  # the key the client sends this target
    store_path: str | None = None  # fastgate-limited: its SQLite key store (usage read back after a round)
    models: tuple[str, ...] = ()  # the key's model allow-list, if any (the auth phase checks a 403)
    upstreams: tuple[Managed, ...] = ()  # its own fake Ollamas (fastgate-3backends); () : the shared one
    aux: tuple[Managed, ...] = ()  # helper processes whose CPU is reported beside it (redis-server)
    multi_process: bool = False  # workers come and go: read the process tree at every measurement

    @property
    def is_proxy(self) -> bool:
        return self.process is not None

    def cpu_ns(self) -> int:
        if self.process is None:
            return 0
        if self.multi_process:
            self.process.refresh()
        return self.process.cpu_ns()

    def aux_cpu_ns(self) -> int:
        return sum(a.cpu_ns() for a in self.aux)

    def rss_kib(self) -> int:
        return self.process.rss_kib() if self.process is not None else 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def accounting(self) -> dict[str, object] | None:
        """What fastgate wrote to its key store (after stop(): it flushes its last batch on SIGTERM):
        usage rows and their tokens, and whether the key's last use was stamped. None without a store."""
        if self.store_path is None:
            return None
        from fastgate.store import KeyStore  # the bench process reads the file fastgate wrote

        with KeyStore(self.store_path) as store:
            rows = store.usage(by="key")
            keys = store.list()
        return {
            "usage_rows": sum(r.requests for r in rows),
            "usage_tokens": sum(r.total_tokens for r in rows),
            "usage_errors": sum(r.errors for r in rows),
            "last_used_stamped": all(k.last_used_at is not None for k in keys),
        }


# -- fastgate ----------------------------------------------------------------------------------------------

STATE_DATABASES = {"redis": 1, "workers1": 2, "workers2": 3}


def fastgate_config(port: int, upstream_port: int, log_level: str = "INFO", store_path: str = "", *,
                    backend_ports: tuple[int, ...] = (), state_url: str = "", workers: int = 0) -> str:
    """fastgate's config; with `store_path`, a key store and no config-file key (the client must use the
    managed key, so a request served with the config key's admin principal cannot pass unnoticed).
    `backend_ports`: [[backends]] (one per port) instead of upstream.url; `state_url`: [state] (Redis);
    `workers`: [server] workers."""
    keys = f'"{API_KEY}" = "{API_USER}"' if not store_path else ""
    store = f'\n[store]\npath = "{store_path}"\n' if store_path else ""
    server_more = f"workers = {workers}\n" if workers else ""
    if backend_ports:
        upstream = "".join(f'[[backends]]\nname = "gpu{i + 1}"\nurl = "http://{HOST}:{bp}"\n\n'
                           for i, bp in enumerate(backend_ports))
    else:
        upstream = f'[upstream]\nurl = "http://{HOST}:{upstream_port}"\n'
    state = f'\n[state]\nurl = "{state_url}"\n' if state_url else ""
    return f"""# generated by bench/targets.py
[server]
listen = "{HOST}:{port}"
{server_more}
{upstream}
[auth]
session_ttl = 0  # no IP trust: a request without a key is a 401, like nginx's map and the seed's dict

[log]
level = "{log_level}"
{store}{state}
[keys]
{keys}
"""


def create_managed_key(store_path: str) -> str:
    """A fresh key store holding one managed key (role user, MANAGED_MODELS, MANAGED_LIMITS); its secret.

    Every start gets a new file, so each round's proxy begins with an empty usage table."""
    from fastgate.store import KeyStore

    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(store_path + suffix)
        except FileNotFoundError:
            pass
    with KeyStore(store_path) as store:
        _, secret = store.add(MANAGED_USER, role="user", models=MANAGED_MODELS, now=time.time(),
                              **MANAGED_LIMITS)
    return secret


def start_fastgate(run_dir: str, upstream_port: int, cpus: set[int] | None, log_level: str,
                   variants: str = "", managed: bool = False, *, kind: str = "",
                   resources: RunResources | None = None) -> Target:
    """fastgate as users run it; with `variants`, through bench.variants (patched at startup); `managed`:
    serving a managed key from a key store (fastgate-limited); `kind`: "3backends", "redis" (managed, with
    [state] in the run's redis-server), "workers2" ([server] workers = 2, with [state]) or "workers1" (the
    same with workers = 1)."""
    port = free_port()
    name = f"fastgate:{variants}" if variants else "fastgate"
    if managed:
        name = "fastgate-limited" + (f":{variants}" if variants else "")
    if kind:
        name = f"fastgate-{kind}" + (f":{variants}" if variants else "")
    stem = name.replace(":", "-").replace("+", "-")
    path = os.path.join(run_dir, f"{stem}.toml")
    store_path = os.path.join(run_dir, f"{stem}-keys.db") if managed else ""
    key = create_managed_key(store_path) if managed else API_KEY
    upstreams: tuple[Managed, ...] = ()
    aux: tuple[Managed, ...] = ()
    state_url = ""
    if kind in ("redis", "workers1", "workers2"):
        assert resources is not None
        redis = resources.redis()
        aux = (redis.process,)
        # One database per target: the targets share the run's redis-server, and shared key-guessing windows
        # would add up the auth phase's wrong keys of every target into one lockout of 127.0.0.1.
        state_url = redis.url.rsplit("/", 1)[0] + "/" + str(STATE_DATABASES[kind])
    if kind == "3backends":
        assert resources is not None
        upstreams = resources.backend_fakes(BACKENDS)
    with open(path, "w") as f:
        f.write(fastgate_config(port, upstream_port, log_level, store_path,
                                backend_ports=tuple(resources.fake_ports) if upstreams and resources else (),
                                state_url=state_url,
                                workers={"workers1": 1, "workers2": WORKERS}.get(kind, 0)))
    argv = [sys.executable, "-m", "fastgate", "serve", "--config", path]
    if variants:
        argv = [sys.executable, "-m", "bench.variants", variants, "serve", "--config", path]
    proc = spawn(name, argv, log_path=os.path.join(run_dir, "logs", f"{stem}.log"), cpus=cpus, cwd=ROOT)
    try:
        wait_port(HOST, port, 20, proc.proc)
        if kind == "workers2":
            _wait_processes(proc, 1 + WORKERS, 20)
        if kind == "3backends":
            _wait_backends_up(port, BACKENDS, 20)
    except BaseException:
        proc.stop()
        raise
    proc.refresh()
    target = Target(name, port, proc, upstreams=upstreams, aux=aux, multi_process=kind.startswith("workers"))
    if managed:
        target.key = key
        target.store_path = store_path
        target.models = MANAGED_MODELS
    return target


def _wait_processes(proc: Managed, count: int, timeout_s: float) -> None:
    """A supervisor's workers listen shortly after it starts: wait until all of them exist."""
    deadline = time.monotonic() + timeout_s
    while len(proc.refresh()) < count:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: {len(proc.pids)} processes after {timeout_s} s, expected {count}")
        time.sleep(0.05)
    time.sleep(0.3)  # the last worker's listener (the tree shows the process a moment before it accepts)


def _wait_backends_up(port: int, count: int, timeout_s: float) -> None:
    """Until fastgate's /health (with the admin key) shows every backend up with its inventory read: the
    first requests must not find a backend still unprobed."""
    import http.client

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/health", headers={"X-API-Key": API_KEY})
            body = json.loads(conn.getresponse().read() or b"{}")
            conn.close()
            backends = body.get("backends", [])
            last = str(backends)[:300]
            if len(backends) == count and all(b.get("state") == "up" and b.get("models") for b in backends):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"fastgate's backends not all up after {timeout_s} s: {last}")


class Redis:
    """A redis-server of the run's own, on a free loopback port, no persistence; stopped by PID."""

    def __init__(self, run_dir: str, cpus: set[int] | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        workdir = os.path.join(run_dir, "redis")
        os.makedirs(workdir, exist_ok=True)
        self.process = spawn("redis", [binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                                       "--appendonly", "no", "--dir", workdir, "--daemonize", "no"],
                             log_path=os.path.join(run_dir, "logs", "redis.log"), cpus=cpus)
        wait_port(HOST, self.port, REDIS_STARTUP_S, self.process.proc)
        self.process.refresh()


class RunResources:
    """Processes some targets need for the whole run, started on first use: the run's redis-server, and
    the fake Ollamas behind fastgate-3backends. Stopped by PID at the end of the run."""

    def __init__(self, run_dir: str, cpus: set[int] | None, lean: bool) -> None:
        self.run_dir = run_dir
        self.cpus = cpus
        self.lean = lean
        self._redis: Redis | None = None
        self.fakes: list[Managed] = []
        self.fake_ports: list[int] = []

    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = Redis(self.run_dir, self.cpus)
        return self._redis

    def backend_fakes(self, count: int) -> tuple[Managed, ...]:
        while len(self.fakes) < count:
            proc, port = start_upstream(self.run_dir, self.cpus, self.lean, tag=f"-gpu{len(self.fakes) + 1}")
            self.fakes.append(proc)
            self.fake_ports.append(port)
        return tuple(self.fakes[:count])

    def stop(self) -> None:
        for proc in self.fakes:
            proc.stop()
        if self._redis is not None:
            self._redis.process.stop()


# -- nginx -------------------------------------------------------------------------------------------------

def nginx_config(prefix: str, port: int, upstream_port: int) -> str:
    """Debian's nginx as people put it in front of Ollama, done properly for streaming: one worker,
    unbuffered HTTP/1.1 upstream with keep-alive, and a `map` from the key header to a user (401 if none)."""
    return f"""# generated by bench/targets.py
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/nginx-error.log warn;
worker_rlimit_nofile 20000;

events {{
    worker_connections 8192;
}}

http {{
    access_log {prefix}/logs/nginx-access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    tcp_nodelay on;
    keepalive_timeout 75s;

    map $http_x_api_key $api_user {{
        default "";
        "{API_KEY}" "{API_USER}";
    }}

    upstream ollama {{
        server {HOST}:{upstream_port};
        keepalive 64;
    }}

    server {{
        listen {HOST}:{port} backlog=1024;

        location / {{
            if ($api_user = "") {{
                return 401 '{{"error":"unauthorized"}}';
            }}
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST}:{upstream_port};
            proxy_set_header X-API-Key "";
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_cache off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            client_max_body_size 0;
        }}
    }}
}}
"""


def start_nginx(run_dir: str, upstream_port: int, cpus: set[int] | None) -> Target:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise RuntimeError("nginx is not installed: run `bash bench/setup.sh`")
    port = free_port()
    prefix = os.path.join(run_dir, "nginx")
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(prefix, port, upstream_port))
    argv = [binary, "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "logs", "nginx-error.log")]
    proc = spawn("nginx", argv, log_path=os.path.join(run_dir, "logs", "nginx.log"), cpus=cpus)
    try:
        wait_port(HOST, port, 20, proc.proc)
        # The master listens before it forks the worker: a tree read too early holds the master alone, and
        # the worker's CPU (all of it) would go uncounted for the round.
        _wait_processes(proc, 2, 20)
    except BaseException:
        proc.stop()
        raise
    return Target("nginx", port, proc)


# -- seed --------------------------------------------------------------------------------------------------

def start_seed(run_dir: str, upstream_port: int, cpus: set[int] | None) -> Target:
    port = free_port()
    keys = os.path.join(run_dir, "seed-keys.json")
    with open(keys, "w") as f:
        json.dump({API_KEY: API_USER}, f)
    proc = spawn("seed", [sys.executable, "-m", "bench.baselines.seed", "--listen", f"{HOST}:{port}",
                          "--upstream", f"http://{HOST}:{upstream_port}", "--keys", keys],
                 log_path=os.path.join(run_dir, "logs", "seed.log"), cpus=cpus, cwd=ROOT)
    wait_port(HOST, port, 30, proc.proc)
    proc.refresh()
    return Target("seed", port, proc)


# -- floor -------------------------------------------------------------------------------------------------

def start_floor(run_dir: str, upstream_port: int, cpus: set[int] | None) -> Target:
    """bench/floor.py: what the design card costs with nothing of fastgate's on top (no key check: the
    client's key is dropped, a wrong one is forwarded too)."""
    port = free_port()
    proc = spawn("floor", [sys.executable, "-m", "bench.floor", "--host", HOST, "--port", str(port),
                           "--upstream-port", str(upstream_port)],
                 log_path=os.path.join(run_dir, "logs", "floor.log"), cpus=cpus, cwd=ROOT)
    wait_port(HOST, port, 20, proc.proc)
    proc.refresh()
    return Target("floor", port, proc)


def start_target(name: str, run_dir: str, upstream_port: int, cpus: set[int] | None,
                 log_level: str, resources: RunResources | None = None) -> Target:
    if name == "direct":
        return Target("direct", upstream_port, None)
    base, _, variants = name.partition(":")
    if base == "fastgate":
        return start_fastgate(run_dir, upstream_port, cpus, log_level, variants)
    if base == "fastgate-limited":
        return start_fastgate(run_dir, upstream_port, cpus, log_level, variants, managed=True)
    if base == "fastgate-redis":
        return start_fastgate(run_dir, upstream_port, cpus, log_level, variants, managed=True, kind="redis",
                              resources=resources)
    if base in ("fastgate-3backends", "fastgate-workers1", "fastgate-workers2"):
        return start_fastgate(run_dir, upstream_port, cpus, log_level, variants, kind=base[len("fastgate-"):],
                              resources=resources)
    if name == "nginx":
        return start_nginx(run_dir, upstream_port, cpus)
    if name == "seed":
        return start_seed(run_dir, upstream_port, cpus)
    if name == "floor":
        return start_floor(run_dir, upstream_port, cpus)
    raise ValueError(f"unknown target {name!r} (known: {', '.join(KNOWN_TARGETS)})")


def start_upstream(run_dir: str, cpus: set[int] | None, lean: bool = True, tag: str = "") -> tuple[Managed, int]:
    """The project's fake Ollama (tests/fake_ollama.py), standalone."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_ollama", "--port", str(port)] + (["--lean"] if lean else [])
    proc = spawn("fake-ollama" + tag, argv,
                 log_path=os.path.join(run_dir, "logs", f"fake_ollama{tag}.log"), cpus=cpus, cwd=ROOT)
    wait_port(HOST, port, 20, proc.proc)
    proc.refresh()
    return proc, port
