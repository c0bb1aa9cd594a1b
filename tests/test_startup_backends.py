"""The startup probe with several backends (issue 9): every [[backends]] table is probed, at once, and the start
line, its warnings and `fastgate check-config` say which answered."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fastgate.config import build_config
from fastgate.startup import BackendsStatus, OllamaStatus, forwarding_to, probe_backends, probe_warnings
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, free_port

KEY = "fg_" + "k" * 43


def three_boxes(a: FakeOllama, b: FakeOllama, dead_port: int) -> str:
    return "".join(f'[[backends]]\nname = "{name}"\nurl = "{url}"\n\n' for name, url in (
        ("gpu1", a.url), ("gpu2", b.url), ("gpu3", f"http://127.0.0.1:{dead_port}")))


async def test_every_backend_is_probed_at_once() -> None:
    async with FakeOllama(version="0.12.6") as a, FakeOllama(version="0.13.0") as b:
        dead = f"http://127.0.0.1:{free_port()}"
        config = build_config({"backends": [{"name": "gpu1", "url": a.url}, {"name": "gpu2", "url": b.url},
                                            {"name": "gpu3", "url": dead}]})
        status = await probe_backends(config)
        assert [r.path for r in a.received] == ["/api/version"] and [r.path for r in b.received] == ["/api/version"]
    assert isinstance(status, BackendsStatus) and status.answered
    assert str(status) == ("backends: gpu1 answered (version 0.12.6), gpu2 answered (version 0.13.0), "
                           "gpu3 did not answer (connection refused)")
    warnings = probe_warnings(config, status)
    assert len(warnings) == 1 and warnings[0].startswith(f"Backend gpu3 ({dead}) did not answer")
    assert forwarding_to(config) == f"3 backends (gpu1 {a.url}, gpu2 {b.url}, gpu3 {dead})"


async def test_none_answering_says_so_and_one_backend_is_probed_as_before() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    config = build_config({"backends": [{"name": "x", "url": dead[0]}, {"name": "y", "url": dead[1]}]})
    status = await probe_backends(config)
    assert isinstance(status, BackendsStatus) and not status.answered
    assert all("no backend answered" in line for line in probe_warnings(config, status))
    async with FakeOllama() as ollama:
        single = build_config({"upstream": {"url": ollama.url}})
        one = await probe_backends(single)
    assert isinstance(one, OllamaStatus) and one.answered and probe_warnings(single, one) == []
    assert forwarding_to(single) == ollama.url


async def test_the_start_line_and_check_config_name_each_backend(tmp_path: Path) -> None:
    async with FakeOllama() as a, FakeOllama() as b:
        dead_port = free_port()
        config = tmp_path / "fastgate.toml"
        config.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\n\n{three_boxes(a, b, dead_port)}'
                          f'[keys]\n"{KEY}" = "me"\n')
        proc = await FastgateProcess.start("serve", "--config", str(config))
        try:
            lines = bytes(proc.log).decode().splitlines()  # the warning comes before the start line
        finally:
            assert await proc.stop() == 0
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastgate", "check-config", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(check.communicate(), 30))[0].decode()
    start = next(line for line in lines if "listening on" in line)
    assert f"forwarding to 3 backends (gpu1 {a.url}, gpu2 {b.url}, gpu3 http://127.0.0.1:{dead_port})" in start
    assert "backends: gpu1 answered (version " in start and "gpu3 did not answer (connection refused)" in start
    assert any("Backend gpu3" in line and "the others take its requests" in line for line in lines), lines
    assert check.returncode == 0, out
    assert "gpu2 answered" in out and "gpu3 did not answer (connection refused)" in out
