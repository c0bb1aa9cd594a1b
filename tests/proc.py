"""Run fastgate as a real process (`python -m fastgate serve ...`) for tests of the CLI, signals and memory."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

READY = re.compile(rb"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, upstream_url: str, *, keys: dict[str, str], extra: str = "",
                 port: int | None = None) -> Path:
    lines = ["[server]", f'listen = "127.0.0.1:{port if port is not None else free_port()}"', "",
             "[upstream]", f'url = "{upstream_url}"', "", extra, "", "[keys]"]
    lines += [f'"{k}" = "{u}"' for k, u in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class FastgateProcess:
    """A fastgate subprocess whose log lines are collected; started and stopped by the test."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log = bytearray()
        self.port = 0
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, *args: str, cwd: str | None = None, timeout: float = 15.0) -> FastgateProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastgate", *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self = cls(proc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), max(deadline - loop.time(), 0.01))
            if not line:
                raise RuntimeError(f"fastgate exited before listening: {bytes(self.log).decode(errors='replace')}")
            self.log += line
            match = READY.search(line)
            if match:
                self.port = int(match.group(3))
                break
        self._reader = loop.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.log += line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                return await self.wait()
            except asyncio.TimeoutError:
                self.proc.kill()
                return await self.proc.wait()
        return self.proc.returncode
