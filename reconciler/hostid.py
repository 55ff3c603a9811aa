"""Who this host is, as the kernel sees it, and the replica name that follows from it.

Hostnames are not unique: containers share them, cloned machines share them. The boot id
(new at every boot of every kernel, cloned or not) and the PID namespace (one per
container) are. Must never do I/O beyond reading /proc.
"""

from __future__ import annotations

import hashlib
import os
import socket


def _boot_and_pidns() -> tuple[str, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = "?"
    return boot, pidns


def host_id() -> str:
    """This host as the kernel sees it: boot id and PID namespace, beside the hostname
    (containers and cloned machines share hostnames; they never share both of these)."""
    boot, pidns = _boot_and_pidns()
    return f"{socket.gethostname()}/{boot}/{pidns}"


def default_instance_name() -> str:
    """`instance.name` when the config gives none: the hostname and 8 hex digits of the
    host identity (boot id and PID namespace), e.g. `node-3f0a9c1e`. Two hosts that share
    a hostname get two names; a restart on the same host keeps its name (so that it takes
    back its own claims at once). A reboot or a new container is a new name."""
    boot, pidns = _boot_and_pidns()
    digest = hashlib.sha256(f"{boot}/{pidns}".encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"
