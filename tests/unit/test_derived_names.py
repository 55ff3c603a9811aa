"""Derived identifiers stay within PostgreSQL's 63 bytes without colliding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.config import MAX_IDENT_BYTES, ConfigError, derived_ident, from_mapping
from reconciler.migrations import render_migrations
from reconciler.schema_needs import render_grants

_ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", fullmatch=True)
_suffix = st.sampled_from(["_open_idx", "_job_idx", "_notify", "_done", "_x"])


@pytest.mark.parametrize(("base", "suffix"), [
    ("rq_reconciler_cancel_requests", "_open_idx"),
    ("rq_reconciler_cancel", "_done"),
    ("a" * 56, "_notify"),  # 63 exactly
])
def test_names_that_fit_are_unchanged(base: str, suffix: str) -> None:
    assert derived_ident(base, suffix) == base + suffix


def test_a_long_name_keeps_its_suffix_and_a_readable_head() -> None:
    name = derived_ident("r" * 63, "_open_idx")
    assert len(name) == MAX_IDENT_BYTES
    assert name.startswith("r" * 40) and name.endswith("_open_idx")


def test_two_long_names_sharing_sixty_characters_do_not_meet() -> None:
    a, b = "x" * 60 + "one", "x" * 60 + "two"
    for suffix in ("_open_idx", "_job_idx", "_notify", "_done"):
        assert derived_ident(a, suffix) != derived_ident(b, suffix)
    # and the two indexes of one table never meet either
    assert derived_ident(a, "_open_idx") != derived_ident(a, "_job_idx")


def test_multibyte_names_are_cut_on_a_character_boundary() -> None:
    name = derived_ident("é" * 40, "_idx")
    assert len(name.encode()) <= MAX_IDENT_BYTES
    name.encode("utf-8").decode("utf-8")  # still valid UTF-8


@given(_ident, _ident, _suffix)
def test_derived_names_fit_and_differ(a: str, b: str, suffix: str) -> None:
    na, nb = derived_ident(a, suffix), derived_ident(b, suffix)
    assert len(na.encode()) <= MAX_IDENT_BYTES
    assert na.endswith(suffix)
    if a != b:
        assert na != nb


def test_channel_of_63_characters_gets_a_done_channel_that_fits() -> None:
    ch = "c" * 63
    cfg = from_mapping({"cancel": {"channel": ch}}, environ={})
    assert cfg.cancel.channel == ch
    assert len(cfg.done_channel) <= MAX_IDENT_BYTES
    assert cfg.done_channel.endswith("_done") and cfg.done_channel != ch
    with pytest.raises(ConfigError):
        from_mapping({"cancel": {"channel": "c" * 64}}, environ={})


def test_rendered_sql_has_no_identifier_over_63_bytes() -> None:
    import re

    cfg = from_mapping({"cancel": {"requests_table": "app." + "q" * 63,
                                   "channel": "n" * 63}}, environ={})
    sql = render_migrations(cfg) + render_grants(cfg, daemon_role="d" * 63, app_role="r" * 63)
    for ident in re.findall(r'"((?:[^"]|"")*)"', sql):
        assert len(ident.encode()) <= MAX_IDENT_BYTES, ident


def test_short_names_render_no_legacy_cleanup() -> None:
    sql = render_migrations(from_mapping({}, environ={}))
    assert "legacy_names" not in sql
    assert '"rq_reconciler_cancel_requests_open_idx"' in sql
    assert '"rq_reconciler_cancel_requests_notify"' in sql
