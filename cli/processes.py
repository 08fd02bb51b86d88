"""Starting and stopping node processes by PID, safely.

A PID from cluster.json is trusted only while that process is alive AND its command line still
names the node's config file: PIDs get reused, and kvctl must never signal a stranger. Nothing
here kills by name. Nodes run in their own session, so a Ctrl-C in kvctl's terminal never
reaches them; kvctl stops them explicitly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cli.errors import KvctlError

STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.05
_EXEC_SETTLE_S = 0.5  # kernel threads have an empty argv for good; a new process only briefly


@dataclass(frozen=True, slots=True)
class NodeProcess:
    pid: int | None
    config_path: Path  # appears in the node's argv: the proof that the PID is still the node


def spawn(argv: Sequence[str], env_overlay: Mapping[str, str], log_path: Path) -> int:
    """Starts argv detached (new session, stdin /dev/null, stdout+stderr appended to log_path)
    and returns its PID. kvctl may exit right after: nobody holds a Popen to warn or wait."""
    env = {**os.environ, **env_overlay}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(log_fd, f"--- {stamp} kvctl started: {' '.join(argv)}\n".encode())
        return os.posix_spawnp(
            argv[0],
            list(argv),
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    except OSError as error:
        raise KvctlError(f"cannot start `{' '.join(argv)}`: {error}") from None
    finally:
        os.close(log_fd)


def is_running(process: NodeProcess) -> bool:
    """True when the PID is alive and still runs this node's config (not a zombie, not reused)."""
    pid = process.pid
    if pid is None or pid <= 0 or has_exited(pid):
        return False
    return str(process.config_path) in _command_line_after_exec(pid)


def has_exited(pid: int) -> bool:
    """True once the process is gone or a zombie. Reaps it if it is kvctl's own child: a child
    that exited stays a zombie (and os.kill(pid, 0) succeeds) until its parent waits for it."""
    _reap_if_our_child(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, but another user's
        return False
    if _state(pid) == "Z":
        _reap_if_our_child(pid)
        return True
    return False


def stop_all(
    processes: Sequence[NodeProcess],
    *,
    timeout_s: float = STOP_TIMEOUT_S,
    is_hurried: Callable[[], bool] = lambda: False,
) -> list[str]:
    """SIGTERM every running one, wait up to timeout_s (less once is_hurried()), SIGKILL the rest.
    Returns one outcome per process: "not running", "stopped" or "killed"."""
    outcomes = ["not running"] * len(processes)
    running: list[int] = []
    for index, process in enumerate(processes):
        if is_running(process) and process.pid is not None:
            _signal(process.pid, signal.SIGTERM)
            outcomes[index] = "stopped"
            running.append(index)
    deadline = time.monotonic() + timeout_s
    while running and time.monotonic() < deadline and not is_hurried():
        running = [index for index in running if not _has_exited(processes[index])]
        if running:
            time.sleep(_POLL_INTERVAL_S)
    for index in running:
        pid = processes[index].pid
        if pid is not None and is_running(processes[index]):
            _signal(pid, signal.SIGKILL)
            outcomes[index] = "killed"
    kill_deadline = time.monotonic() + 5.0
    while running and time.monotonic() < kill_deadline:
        running = [index for index in running if not _has_exited(processes[index])]
        if running:
            time.sleep(_POLL_INTERVAL_S)
    if running:
        pids = ", ".join(str(processes[index].pid) for index in running)
        raise KvctlError(f"process(es) {pids} survived SIGKILL; check them with `ps`")
    return outcomes


def _has_exited(process: NodeProcess) -> bool:
    return process.pid is None or has_exited(process.pid)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            data = log.read()
    except OSError as error:
        return f"(cannot read {path}: {error.strerror})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(empty)"


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it exited meanwhile: what we wanted
    except PermissionError:
        raise KvctlError(
            f"not allowed to send {signum.name} to pid {pid}: run kvctl as the user that "
            "started the cluster"
        ) from None


def _reap_if_our_child(pid: int) -> None:
    """A child of this kvctl that exited stays a zombie (and os.kill(pid, 0) succeeds) until
    waited for; reap it. Other processes' PIDs raise ChildProcessError: not ours to reap."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _state(pid: int) -> str:
    """The process state letter ("R", "S", "Z", ...), or "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return ""
        try:
            result = subprocess.run(
                ["ps", "-o", "state=", "-p", str(pid)],
                capture_output=True,
                text=True,
                check=False,
                timeout=5,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.strip()[:1]
    except OSError:
        return ""
    # "pid (comm) S ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat[stat.rfind(")") + 1 :].split()
    return fields[0] if fields else ""


def _command_line_after_exec(pid: int) -> list[str]:
    """The argv, waiting briefly while it reads empty: posix_spawn returns as soon as exec has
    swapped the address space, a moment before the kernel fills in the new argv."""
    deadline = time.monotonic() + _EXEC_SETTLE_S
    while True:
        argv = _command_line(pid)
        if argv or time.monotonic() >= deadline or has_exited(pid):
            return argv
        time.sleep(0.005)


def _command_line(pid: int) -> list[str]:
    """The process's argv; empty for zombies and kernel threads."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return []  # the process is gone
        return _command_line_from_ps(pid)
    except OSError:
        return []
    return [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0") if part]


def _command_line_from_ps(pid: int) -> list[str]:
    """Without /proc (macOS): ps prints the command joined by spaces, so split it."""
    try:
        result = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return result.stdout.split()
