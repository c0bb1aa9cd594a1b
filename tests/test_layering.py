"""The pure core imports without asyncio or any other I/O layer: checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PURE_MODULES = ["fastgate.config", "fastgate.keys", "fastgate.trust", "fastgate.messages", "fastgate.gate",
                "fastgate.errors", "fastgate.logs", "fastgate.access", "fastgate.limits", "fastgate.usage",
                "fastgate.cors", "fastgate.metrics", "fastgate.store", "fastgate.admin", "fastgate.models",
                "fastgate.forms", "fastgate.gojson", "fastgate.routing", "fastgate.routing.choice",
                "fastgate.routing.health", "fastgate.routing.waiting", "fastgate.state",
                "fastgate.routing.aggregate", "fastgate.metrics_sum"]
IO_MODULES = ["asyncio", "ssl", "h11", "uvloop", "socket"]
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def imported_after(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import fastgate\n"
        "print(json.dumps([fastgate.__file__, sorted(sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    package_file, modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(package_file).resolve().parent == PROJECT_ROOT / "fastgate"  # this checkout, not an install
    return set(modules)


def test_pure_modules_do_not_import_io() -> None:
    loaded = imported_after(PURE_MODULES)
    assert set(PURE_MODULES) <= loaded  # they really were imported
    assert sorted(m for m in IO_MODULES if m in loaded) == []
    assert not any(m.startswith("asyncio.") for m in loaded)
    # nothing from the I/O layers was dragged in either
    assert not {"fastgate.proxy", "fastgate.connection", "fastgate.upstream", "fastgate.server",
                "fastgate.tls", "fastgate.cli"} & loaded


def test_the_check_can_see_asyncio() -> None:
    # Guard against a broken probe that would make the tests above pass vacuously.
    assert "asyncio" in imported_after(["fastgate.proxy"])


def test_the_redis_client_is_imported_only_with_state() -> None:
    # The core install is h11 + uvloop: a server without [state] must not need the `redis` extra.
    loaded = imported_after(["fastgate.server", "fastgate.cli"])
    assert "fastgate.server" in loaded
    assert not {m for m in loaded if m == "redis" or m.startswith(("redis.", "hiredis", "fastgate.state.redis"))}


def test_store_interface_loads_no_database_driver() -> None:
    # The core install (SQLite store, `fastgate keys`) never needs psycopg: only [store] url imports it.
    loaded = imported_after(["fastgate.state.stores", "fastgate.admin"])
    assert "fastgate.state.stores" in loaded
    assert not {"psycopg", "fastgate.state.postgres_store"} & loaded
    assert sorted(m for m in IO_MODULES if m in loaded) == []
