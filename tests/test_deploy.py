"""The deployment files under deploy/ (issue 12): the systemd unit and the Grafana dashboard.

The unit is checked by `systemd-analyze verify` (Debian's systemd package; .ci/run installs it), against what
`pip install` creates, and by running its ExecStart and ExecReload commands the way systemd would. The
dashboard is checked against a live scrape: every metric, label and label value its PromQL queries must be in
fastgate's /metrics after mixed traffic, so a renamed metric or label fails here instead of going blank.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from fastgate.access import Principal, Role
from fastgate.config import load_config
from fastgate.server import RunningServer, plan_open_files
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.proc import READY
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "fastgate.service"
DEPLOY_CONFIG = ROOT / "deploy" / "fastgate.toml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fastgate.json"
# The install layout the unit documents: a virtualenv at PREFIX, made with `python3 -m venv PREFIX` and filled
# with `PREFIX/bin/pip install ...`.
PREFIX = "/opt/fastgate"


# ---------------------------------------------------------------------------------------------------------
# The systemd unit


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (a key may repeat, like SystemCallFilter=). Comments are left out."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key)
    assert values is not None and len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_settings(UNIT.read_text())


def installed_script() -> Path:
    """The console script `pip install` made for this interpreter's environment (the test venv is itself a
    `pip install -e .` of this checkout): `<scripts dir>/<name from [project.scripts]>`."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastgate"] == "fastgate.cli:main"
    path = Path(sysconfig.get_path("scripts")) / "fastgate"
    assert path.is_file() and os.access(path, os.X_OK), f"{path}: pip did not create the console script here"
    return path


def systemd_analyze() -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("systemd units are Linux only")
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package "
                    "(.ci/run does: apt-get install systemd)")
    return found


def scratch_unit(tmp_path: Path, prefix: Path) -> Path:
    """The unit with PREFIX replaced by `prefix`, under its own name in a directory of its own.

    `systemd-analyze verify` checks that ExecStart's binary exists and is executable; the unit names
    /opt/fastgate/bin/fastgate, which this machine need not have (and a test must not create outside its
    temporary directory). `--root=DIR` does not help: it then also wants every unit the service depends on
    (sysinit.target, ...) and /bin/kill under DIR. So the check runs on a copy whose only change is the
    prefix, pointing at a scratch layout that holds what pip installs at PREFIX/bin."""
    text = UNIT.read_text()
    assert text.count(PREFIX + "/") >= 1
    path = tmp_path / "unit" / "fastgate.service"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace(PREFIX + "/", f"{prefix}/"))
    return path


def scratch_layout(tmp_path: Path) -> Path:
    """tmp_path/opt/fastgate/bin/fastgate: the script pip installed for the tests, where the unit wants it."""
    prefix = tmp_path / PREFIX.lstrip("/")
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "fastgate").symlink_to(installed_script())
    return prefix


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit_path = scratch_unit(tmp_path, scratch_layout(tmp_path))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit_path)], capture_output=True, text=True,
                            timeout=30)
    # Unknown keys, bad values and missing commands are printed (some only as warnings, with status 0).
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_does_catch_a_missing_binary(tmp_path: Path) -> None:
    """What makes the check above pass is the scratch binary: without it, verify fails on ExecStart."""
    analyze = systemd_analyze()
    unit_path = scratch_unit(tmp_path, tmp_path / "nothing-installed-here")
    result = subprocess.run([analyze, "verify", "--man=no", str(unit_path)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0
    assert "nothing-installed-here/bin/fastgate is not executable" in result.stderr


def test_unit_hardening_exposure_is_low(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit_path = scratch_unit(tmp_path, scratch_layout(tmp_path))
    result = subprocess.run([analyze, "security", "--offline=true", str(unit_path)], capture_output=True,
                            text=True, timeout=30)
    match = re.search(r"Overall exposure level for fastgate\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout  # 1.5 when written; 10 is an unhardened service


def test_unit_settings(unit: dict[str, list[str]]) -> None:
    # fastgate does not implement sd_notify: Type=notify would leave the start hanging until it times out.
    assert one(unit, "Service.Type") == "exec"
    assert one(unit, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service.DynamicUser") == "yes"
    assert one(unit, "Service.ProtectSystem") == "strict"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices", "RestrictNamespaces",
                "RestrictSUIDSGID", "LockPersonality"):
        assert one(unit, f"Service.{key}") == "yes", key
    assert set(one(unit, "Service.RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["Service.SystemCallFilter"][0] == "@system-service"
    # No capability unless the admin opts in to a port below 1024, as the commented lines document.
    assert "Service.AmbientCapabilities" not in unit
    assert one(unit, "Service.CapabilityBoundingSet") == ""
    text = UNIT.read_text()
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in text and "below 1024" in text
    assert one(unit, "Install.WantedBy") == "multi-user.target"


def test_unit_paths_match_what_pip_install_creates(unit: dict[str, list[str]]) -> None:
    argv = shlex.split(one(unit, "Service.ExecStart"))
    # The binary: PREFIX/bin/<console script>, the scripts directory of a venv at PREFIX.
    scheme = "venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix"
    scripts_dir = sysconfig.get_path("scripts", scheme, vars={"base": PREFIX, "platbase": PREFIX})
    assert argv[0] == f"{scripts_dir}/{installed_script().name}" == f"{PREFIX}/bin/fastgate"
    assert f"python3 -m venv {PREFIX}" in UNIT.read_text()  # the layout is documented where it is assumed
    assert argv[1] == "serve"
    # The config: in the unit's ConfigurationDirectory, and the store it names in its StateDirectory.
    config_path = Path(argv[argv.index("--config") + 1])
    assert config_path == Path("/etc") / one(unit, "Service.ConfigurationDirectory") / "fastgate.toml"
    config = load_config(str(DEPLOY_CONFIG))
    state_dir = Path("/var/lib") / one(unit, "Service.StateDirectory")
    assert Path(config.store.path).parent == state_dir
    assert not config.keys  # the file is world-readable for the dynamic user: keys belong in the store
    assert Path(shlex.split(one(unit, "Service.ExecReload"))[0]).is_file()
    # systemd sends SIGTERM and waits TimeoutStopSec for the graceful shutdown before SIGKILL.
    assert float(one(unit, "Service.TimeoutStopSec")) > config.server.shutdown_grace
    # LimitNOFILE holds the configured connections without fastgate lowering max_connections.
    limit = int(one(unit, "Service.LimitNOFILE"))
    plan = plan_open_files(limit, limit, config.server.max_connections, config.upstream.max_idle_connections)
    assert plan.max_connections == config.server.max_connections and not plan.messages


async def _read_until(proc: asyncio.subprocess.Process, log: bytearray, pattern: re.Pattern[bytes],
                      timeout: float = 15.0) -> re.Match[bytes]:
    assert proc.stdout is not None

    async def read() -> re.Match[bytes]:
        while True:
            line = await proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"fastgate exited; log:\n{log.decode(errors='replace')}")
            log.extend(line)
            if found := pattern.search(line):
                return found
    return await asyncio.wait_for(read(), timeout)


async def test_unit_commands_run_as_systemd_runs_them(tmp_path: Path, unit: dict[str, list[str]]) -> None:
    """ExecStart with the deploy config (paths moved into a scratch root): it starts, creates the store in the
    state directory, reloads on ExecReload, and exits 0 on SIGTERM."""
    root = tmp_path / "root"
    root.mkdir()
    scratch_layout(root)

    def moved(path: str) -> str:
        return str(root / path.lstrip("/"))

    argv = shlex.split(one(unit, "Service.ExecStart"))
    config_path = Path(moved(argv[argv.index("--config") + 1]))
    config_path.parent.mkdir(parents=True)  # what ConfigurationDirectory= and the admin's install do
    state_dir = Path(moved("/var/lib/" + one(unit, "Service.StateDirectory")))
    state_dir.mkdir(parents=True, mode=0o700)  # what StateDirectory= does
    store_path = load_config(str(DEPLOY_CONFIG)).store.path
    config_text = DEPLOY_CONFIG.read_text().replace(f'"{store_path}"', f'"{moved(store_path)}"')
    assert moved(store_path) in config_text  # never the real /var/lib
    config_path.write_text(config_text)
    argv = [moved(argv[0]), *(moved(a) if a.startswith("/etc/") else a for a in argv[1:])]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--listen", "127.0.0.1:0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = bytearray()
    try:
        port = int((await _read_until(proc, log, READY)).group(3))
        assert Path(moved(store_path)).is_file()
        c = await Client.connect(port)
        assert (await c.request("GET", "/")).status == 200
        await c.close()
        reload_cmd = one(unit, "Service.ExecReload").replace("$MAINPID", str(proc.pid))
        assert subprocess.run(shlex.split(reload_cmd), timeout=10).returncode == 0
        await _read_until(proc, log, re.compile(rb"Reloaded"))
        proc.send_signal(signal.SIGTERM)  # systemd's default KillSignal
        assert await asyncio.wait_for(proc.wait(), float(one(unit, "Service.TimeoutStopSec"))) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------------------------------------
# The Grafana dashboard: a small PromQL reader, enough for what dashboards write

TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus when it scrapes, not in /metrics
AGGREGATORS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                         "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
GROUPING = frozenset({"by", "without"})
VECTOR_MATCHING = frozenset({"on", "ignoring", "group_left", "group_right"})
BINARY_KEYWORDS = frozenset({"and", "or", "unless", "bool"})
TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},])
""", re.X)


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    # (labels, selectors they must exist on)
    groupings: list[tuple[list[str], list[Selector]]] = field(default_factory=list)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup or "", m.group()))
    return tokens


def parse_promql(expr: str) -> Query:
    """Selectors (metric and label matchers) and grouping labels (`by`, `without`, `on`, ...) with the
    selectors each applies to. Raises ValueError on what it does not know, so the dashboard stays
    checkable."""
    toks = tokenize(expr)
    query = Query()
    positions: list[int] = []  # token index of each selector in query.selectors
    spans: list[tuple[list[str], int, int]] = []  # grouping labels, token range of the selectors they cover

    def at(i: int) -> str:
        return toks[i][1] if i < len(toks) else ""

    def matching_paren(i: int) -> int:
        depth = 0
        for j in range(i, len(toks)):
            depth += {"(": 1, ")": -1}.get(at(j), 0)
            if depth == 0:
                return j
        raise ValueError(f"unbalanced parentheses in {expr!r}")

    def label_list(i: int) -> tuple[list[str], int]:  # toks[i] == "("; returns labels, index after ")"
        if at(i) != "(":
            raise ValueError(f"expected a label list at token {i} of {expr!r}")
        end = matching_paren(i)
        labels = [text for kind, text in toks[i + 1:end] if kind == "ident"]
        return labels, end + 1

    skip: set[int] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        if i in skip or kind != "ident":
            i += 1
            continue
        if text in AGGREGATORS:
            j, labels = i + 1, []
            if at(j) in GROUPING:
                labels, j = label_list(j + 1)
                skip.update(range(i + 1, j))
            end = matching_paren(j)
            if at(end + 1) in GROUPING:
                more, after = label_list(end + 2)
                labels += more
                skip.update(range(end + 1, after))
            spans.append((labels, j, end))
            i = j
        elif text in VECTOR_MATCHING:
            labels, j = label_list(i + 1) if at(i + 1) == "(" else ([], i + 1)  # group_left may list none
            spans.append((labels, 0, len(toks)))  # both sides of the operation: every selector of the query
            skip.update(range(i, j))
            i = j
        elif text in GROUPING:
            raise ValueError(f"{text!r} outside an aggregation in {expr!r}")
        elif text in BINARY_KEYWORDS:
            i += 1
        elif at(i + 1) == "(":
            i += 1  # a function: rate, histogram_quantile, ...
        elif text == "offset" or text == "@":
            raise ValueError(f"offset / @ not supported by this checker: {expr!r}")
        else:
            matchers: list[tuple[str, str, str]] = []
            j = i + 1
            if at(j) == "{":
                end = j + 1
                while at(end) != "}":
                    if end + 2 >= len(toks) or toks[end][0] != "ident" or toks[end + 2][0] != "str":
                        raise ValueError(f"cannot read the label matchers of {text} in {expr!r}")
                    value = toks[end + 2][1][1:-1].encode().decode("unicode_escape")
                    matchers.append((toks[end][1], toks[end + 1][1], value))
                    end += 3
                    if at(end) == ",":
                        end += 1
                j = end + 1
            query.selectors.append(Selector(text, matchers))
            positions.append(i)
            i = j
    for labels, start, end in spans:
        covered = [s for s, pos in zip(query.selectors, positions) if start <= pos <= end]
        if labels:
            query.groupings.append((labels, covered))
    return query


Scrape = dict[str, list[dict[str, str]]]  # metric -> the label sets of its series
SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+\S+")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_scrape(text: str) -> Scrape:
    series: Scrape = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        series.setdefault(m.group(1), []).append(dict(LABEL.findall(m.group(2) or "")))
    return series


def _matches(op: str, pattern: str, value: str) -> bool:
    if op == "=":
        return value == pattern
    if op == "!=":
        return value != pattern
    hit = re.fullmatch(pattern, value) is not None  # Prometheus anchors its regexes
    return hit if op == "=~" else not hit


def check_query(expr: str, scrape: Scrape) -> list[str]:
    """What in `expr` the scrape does not have: a metric, a label, or series its matchers select. Matchers on
    a `$variable` and on target labels (job, instance) are left out: Grafana and Prometheus supply those."""
    problems = []
    query = parse_promql(expr)
    if not query.selectors:
        problems.append(f"{expr}: no metric")
    for sel in query.selectors:
        series = scrape.get(sel.metric)
        if not series:
            problems.append(f"{expr}: metric {sel.metric} is not in /metrics")
            continue
        known = set().union(*series) | TARGET_LABELS
        for label, _, _ in sel.matchers:
            if label not in known:
                problems.append(f"{expr}: {sel.metric} has no label {label!r}")
        literal = [(label, op, value) for label, op, value in sel.matchers
                   if "$" not in value and label not in TARGET_LABELS]
        if not any(all(_matches(op, value, labels.get(label, "")) for label, op, value in literal)
                   for labels in series):
            problems.append(f"{expr}: {sel.metric}{{{literal}}} selects no series after the test traffic")
    for labels, selectors in query.groupings:
        for sel in selectors:
            have = set().union(*scrape.get(sel.metric, [{}])) | TARGET_LABELS
            problems += [f"{expr}: {sel.metric} has no label {label!r} to group by"
                         for label in labels if label not in have]
    return problems


def dashboard_panels(dash: dict) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row holds its panels
    return out


def dashboard_queries(dash: dict) -> list[str]:  # type: ignore[type-arg]
    """Every PromQL expression: panel targets and the query variables (label_values(SELECTOR, LABEL) becomes
    `group by (LABEL) (SELECTOR)`, which asks the same of the scrape)."""
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\s*\)", var["query"].strip())
        assert m, f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {var['query']!r}"
        exprs.append(f"group by ({m.group(2)}) ({m.group(1)})")
    return exprs


@pytest.fixture(scope="module")
def dashboard() -> dict:  # type: ignore[type-arg]
    return json.loads(DASHBOARD.read_text())


def test_dashboard_shape(dashboard: dict) -> None:  # type: ignore[type-arg]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        if p["type"] in ("row", "text"):
            continue
        assert p["targets"], p["title"]
        for holder in (p, *p["targets"]):  # every query goes to the chosen Prometheus
            assert holder["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    # Room for per-backend panels: a row kept for them.
    assert any(p["type"] == "row" and "backend" in p["title"].lower() for p in panels)


def test_dashboard_covers_what_the_issue_asks(dashboard: dict) -> None:  # type: ignore[type-arg]
    queries = [parse_promql(e) for e in dashboard_queries(dashboard)]
    metrics = {s.metric for q in queries for s in q.selectors}
    assert {"fastgate_requests_total", "fastgate_tokens_total", "fastgate_upstream_first_byte_seconds_bucket",
            "fastgate_in_flight_requests", "fastgate_auth_failures_total", "fastgate_upstream_up",
            "fastgate_buffered_body_bytes"} <= metrics
    grouped = {(s.metric, label)
               for q in queries for labels, sels in q.groupings for s in sels for label in labels}
    assert {("fastgate_requests_total", "user"), ("fastgate_tokens_total", "user"),
            ("fastgate_tokens_total", "model"), ("fastgate_auth_failures_total", "reason")} <= grouped
    # Errors by user: a query grouped by user over 4xx/5xx answers.
    assert any(("fastgate_requests_total", "user") in {(s.metric, lb) for lbs, sels in q.groupings
                                                         for s in sels for lb in lbs}
               and any(m[0] == "status" for s in q.selectors for m in s.matchers) for q in queries)


def test_promql_reader() -> None:
    q = parse_promql('histogram_quantile(0.9, sum by (le) (rate(a_bucket{job=~"$job"}[$__rate_interval])))'
                     ' / on (instance) group_left sum(b) by (user, kind)')
    assert [(s.metric, s.matchers) for s in q.selectors] == [("a_bucket", [("job", "=~", "$job")]), ("b", [])]
    assert [(labels, [s.metric for s in sels]) for labels, sels in q.groupings] == [
        (["le"], ["a_bucket"]), (["instance"], ["a_bucket", "b"]), (["user", "kind"], ["b"])]
    with pytest.raises(ValueError):
        parse_promql("rate(a[5m] offset 1h)")


def test_the_check_catches_rot() -> None:
    scrape = parse_scrape('# TYPE x counter\nx{user="u",status="401"} 1\ny 2\n')
    assert check_query('sum by (user) (rate(x{status=~"4.."}[5m])) + y', scrape) == []
    assert check_query('sum by (user) (rate(x{instance=~"$instance"}[5m]))', scrape) == []
    assert len(check_query("sum by (usr) (rate(x[5m]))", scrape)) == 1  # a renamed label
    assert len(check_query("rate(x_renamed[5m])", scrape)) == 1  # a renamed metric
    assert len(check_query('rate(x{stat="401"}[5m])', scrape)) == 2  # a renamed matcher label, no series
    assert len(check_query('rate(x{status=~"5.."}[5m])', scrape)) == 1  # a value format that changed
    assert len(check_query("sum by (user) (y)", scrape)) == 1  # grouping by a label the metric lacks


MANAGED_SECRET = "fg_test-deploy-managed-key-00000001"


async def test_every_dashboard_query_finds_its_metrics_in_a_live_scrape(
        make_gateway: MakeGateway, ollama: FakeOllama, dashboard: dict) -> None:  # type: ignore[type-arg]
    gateway: RunningServer = await make_gateway()
    principal = Principal("dana", "k_dana", role=Role.USER, models=("qwen2.5:*",), rpm=3)
    gateway.proxy.gate.set_managed_keys({hashlib.sha256(MANAGED_SECRET.encode()).digest(): principal})
    c = await Client.connect(gateway.port)
    chat = {"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}}
    # Chats with tokens: a config key (admin) and a managed key.
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": KEY1},
                           json_body={"model": "llama3.2:latest", **chat})
    assert resp.status == 200 and resp.lines[-1]["eval_count"] > 0
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": MANAGED_SECRET},
                           json_body={"model": "qwen2.5:0.5b", **chat})
    assert resp.status == 200
    # Refusals: a model outside the allow-list, an admin route, the rate limit; a wrong key; no key.
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": MANAGED_SECRET},
                           json_body={"model": "llama3.2:latest", **chat})
    assert resp.status == 403
    assert (await c.request("POST", "/api/pull", headers={"X-API-Key": MANAGED_SECRET},
                            json_body={"model": "x"})).status == 403
    statuses = [(await c.request("GET", "/api/version", headers={"X-API-Key": MANAGED_SECRET})).status
                for _ in range(principal.rpm or 0)]
    assert statuses[-1] == 429
    assert (await c.request("GET", "/api/tags", headers={"X-API-Key": "wrong-key-0000000000"})).status == 401
    assert (await c.request("GET", "/api/tags")).status == 401
    # Ollama failing: a 5xx.
    ollama.faults.append("status-500")
    assert (await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 500
    scraped = await c.request("GET", "/metrics", headers={"X-API-Key": KEY1})
    await c.close()
    assert scraped.status == 200
    scrape = parse_scrape(scraped.body.decode())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20
    problems = [p for expr in queries for p in check_query(expr, scrape)]
    assert problems == []
