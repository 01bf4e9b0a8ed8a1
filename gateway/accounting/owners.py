"""Which process holds a reservation, and whether that process still lives.

A hold row names its web process as ``machine:pid:start``: ``machine`` is
the host name plus the PID namespace, ``start`` the process's start time in
clock ticks since boot (Linux's /proc/<pid>/stat field 22). A sweeper on the
same machine can then tell at once that the process is gone (no such pid,
or the pid now belongs to a newer process) instead of waiting for the
whole-request cap; holds of other machines, or where /proc cannot tell,
wait for the cap as before.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

OWNER_MAX_CHARS = 100


def _start_ticks(pid: int) -> str | None:
    """When a process started (clock ticks since boot), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after
    # its closing parenthesis; the start time is field 22 (20 after it).
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20:
        return None
    return fields[19]


@functools.cache
def machine() -> str:
    """This host and PID namespace: where pids mean the same processes."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def _identity() -> str:
    start = _start_ticks(os.getpid()) or "?"
    return f"{machine()}:{os.getpid()}:{start}"[:OWNER_MAX_CHARS]


# A fork gets a new pid: the cache is keyed by it.
_identities: dict[int, str] = {}


def owner_id() -> str:
    """This process, as hold rows name it."""
    pid = os.getpid()
    identity = _identities.get(pid)
    if identity is None:
        identity = _identities[pid] = _identity()
    return identity


def is_dead_here(owner: str) -> bool:
    """Whether `owner` is a process of this machine that no longer runs.

    False whenever that cannot be known for sure: another machine, an owner
    written by an older version, no /proc.
    """
    try:
        where, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if where != machine() or start == "?" or pid <= 0:
        return False
    if pid == os.getpid():
        return start != _start_ticks(pid)
    current = _start_ticks(pid)
    if current is None:
        # No such process, if /proc itself is readable here.
        return Path("/proc/self/stat").exists()
    return current != start
