"""The default instance name: the hostname plus the host identity, unique per host."""

from __future__ import annotations

import re
import socket

import pytest

from reconciler import hostid
from reconciler.config import from_mapping


def test_the_default_name_is_the_hostname_and_the_host_identity() -> None:
    name = from_mapping({}, environ={}).instance.name
    assert re.fullmatch(re.escape(socket.gethostname()) + r"-[0-9a-f]{8}", name), name
    assert name == hostid.default_instance_name()  # stable across restarts on one host


def test_hosts_that_share_a_hostname_get_names_of_their_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = set()
    for boot, pidns in [("b1", "pid:[1]"), ("b2", "pid:[1]"), ("b1", "pid:[2]")]:
        monkeypatch.setattr(hostid, "_boot_and_pidns", lambda b=boot, p=pidns: (b, p))
        names.add(hostid.default_instance_name())
        assert hostid.host_id().endswith(f"/{boot}/{pidns}")
    assert len(names) == 3


def test_an_explicit_name_is_kept() -> None:
    assert from_mapping({"instance": {"name": "node-1"}}, environ={}).instance.name == "node-1"
