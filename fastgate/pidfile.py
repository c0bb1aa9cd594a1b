"""The pid file (`[server] pid_file`): written at startup so that `fastgate reload` (and a service manager)
finds the running gateway without anyone hunting for its PID, removed again at a clean exit.

Only a live fastgate blocks a start: a file left behind by a crash, whose process is gone or whose number now
belongs to an unrelated program (PIDs are reused, notably across container restarts), is replaced with a note.
A signal is only ever sent to a process that is fastgate, because SIGHUP ends most other programs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

MAX_PID_FILE_BYTES = 64  # a pid file holds one number; anything longer is not one of ours


class PidFileError(Exception):
    """A pid file problem, worded for the operator."""


def read_pid(path: str) -> int | None:
    """The PID written in `path`; None when there is no such file. PidFileError when it cannot be read or
    does not hold a PID."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PID_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidFileError(f"pid file {path}: cannot read it: {exc.strerror}") from None
    try:
        pid = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        pid = 0
    if pid < 1 or len(text) > MAX_PID_FILE_BYTES:
        raise PidFileError(f"pid file {path} does not hold a process id")
    return pid


def process_state(pid: int) -> str:
    """"gone", "fastgate" (a live fastgate process) or "other" (a live process that is not fastgate)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, owned by another user
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        # No /proc (not Linux), or the process ended just now: without /proc, trust the file's word.
        return "fastgate" if not os.path.isdir("/proc/self") else "gone"
    except OSError:
        return "fastgate"  # hidden from us (hidepid): assume the file is right rather than start a second one
    # `fastgate serve`, `python -m fastgate serve`, `/venv/bin/fastgate ...`: the name is on every form.
    return "fastgate" if b"fastgate" in cmdline else "other"


def claim(path: str) -> str | None:
    """Before starting: refuse (PidFileError) when `path` names another live fastgate; returns a note to log
    when it names a process that is gone or is not fastgate (the file is stale and will be replaced)."""
    pid = read_pid(path)
    if pid is None or pid == os.getpid():
        return None
    state = process_state(pid)
    if state == "fastgate":
        raise PidFileError(f"server.pid_file {path} names fastgate process {pid}, which is running: stop it first "
                           f"(or give this instance another pid_file)")
    what = "is gone" if state == "gone" else "is not fastgate"
    return f"Replacing stale pid file {path}: process {pid} {what}"


def write(path: str) -> None:
    """Write this process's PID to `path`, atomically (a reader never sees a half-written file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise PidFileError(f"server.pid_file: cannot write {path}: {exc.strerror}") from None


def remove(path: str) -> None:
    """At exit: remove `path` if it still holds this process's PID (another instance may have taken it over)."""
    try:
        if read_pid(path) == os.getpid():
            os.remove(path)
    except (PidFileError, OSError):
        pass  # nothing to clean up that is ours; the next start treats a leftover as stale


def signal_gateway(path: str, sig: int = signal.SIGHUP) -> int:
    """Send `sig` to the fastgate named by the pid file at `path`; returns its PID. PidFileError, worded for the
    operator, when there is no file, its process is gone or is not fastgate, or the signal is not allowed."""
    pid = read_pid(path)
    if pid is None:
        raise PidFileError(f"no pid file at {path}: is fastgate running with this config? (it writes the file "
                           f"at startup and removes it when it stops)")
    state = process_state(pid)
    if state == "gone":
        raise PidFileError(f"pid file {path} names process {pid}, which is not running (left by a crash?); "
                           f"start fastgate again")
    if state == "other":
        raise PidFileError(f"pid file {path} names process {pid}, which is not fastgate (a stale file whose "
                           f"number was reused): not signalling it")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise PidFileError(f"process {pid} named by {path} ended just now") from None
    except PermissionError:
        raise PidFileError(f"not allowed to signal process {pid} (named by {path}): run this as the user that "
                           f"runs fastgate, or as root") from None
    return pid
