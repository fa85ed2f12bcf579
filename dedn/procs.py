"""Processes on this machine (Linux /proc): who is below whom, who still runs, when one started; ending a group.

Shared by the embedded Ray's clean-up (`dedn.training.ray_cluster`), the team server
(`dedn.tracking.server`), the orphaned-run check (`dedn.tracking.runs`) and the fault tools.
Where there is no /proc, the queries answer as little as they can (no descendants, no start time).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["alive", "descendants", "kill_group", "parent", "process_start", "running"]

PROC = Path("/proc")


def parent(proc: Path, pid: str) -> int:
    """The parent pid of process `pid` (/proc/<pid>/stat field 4)."""
    return int((proc / pid / "stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """Every process below `pid` (children, theirs, ...); [] where there is no /proc."""
    parents: dict[int, int] = {}
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = parent(proc, entry.name)
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [c for c, pp in parents.items() if pp == cur]
        out += kids
        todo += kids
    return out


def running(pids: list[int], proc: Path = PROC) -> list[int]:
    """The pids among `pids` that still run (zombies, already dead, do not count)."""
    out = []
    for pid in pids:
        try:
            if (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except (OSError, IndexError):
            pass
    return out


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot, /proc/<pid>/stat field 22); "" where
    that cannot be read (the pid alone then identifies it); None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        pass
    except (OSError, IndexError):
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return ""
    return "" if not Path("/proc/self/stat").exists() else None


def kill_group(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads (e.g. a server and its workers), SIGKILL after `grace` s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
        except ChildProcessError:
            pass
        if not alive(pid):
            break
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # any worker left behind
    except ProcessLookupError:
        pass
