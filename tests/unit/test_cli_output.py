"""The sweep's change output is streamed page by page: the JSON must stay one valid
document whether the sweep completes, changes nothing, or is cut off midway. The table's
status and reason columns have fixed widths (known from the config); only the id column
widens when a later page brings longer ids."""

from __future__ import annotations

import json

import pytest

from reconciler.cli import _ChangeOutput
from reconciler.config import from_mapping
from reconciler.jobs_table import RowChange
from reconciler.reconcile import PassReport
from reconciler.stop import HorseStop

CFG = from_mapping({})


def change(job_id: object, error: str = "Synced: RQ finished") -> RowChange:
    return RowChange(job_id, "running", "completed", error, "synced", "finished")


def test_json_streamed_over_pages_is_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    out = _ChangeOutput(CFG, as_json=True, dry_run=False)
    out.write([change(1), change(2)])
    out.write([change("a \"quoted\"\nid", error="x" * 500)])
    out.finish({"checked": 9, "changed": 3})
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is False and doc["checked"] == 9 and doc["changed"] == 3
    assert [c["job_id"] for c in doc["changes"]] == ["1", "2", "a \"quoted\"\nid"]
    assert doc["changes"][2]["error"] == "x" * 500  # JSON is not clipped; the table is


def test_json_with_no_changes(capsys: pytest.CaptureFixture[str]) -> None:
    out = _ChangeOutput(CFG, as_json=True, dry_run=True)
    out.finish({"checked": 0, "changed": 0})
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"dry_run": True, "changes": [], "checked": 0, "changed": 0,
                   "horse_stops": [], "rq_cancels": []}


@pytest.mark.parametrize("pages", [0, 1, 2])
def test_json_of_a_sweep_cut_off_midway_is_still_valid(pages: int,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = _ChangeOutput(CFG, as_json=True, dry_run=False)
    for p in range(pages):
        out.write([change(10 * p + 1), change(10 * p + 2)])
    out.abort("Redis is unavailable: Connection refused")
    doc = json.loads(capsys.readouterr().out)
    assert doc["completed"] is False and "Redis" in doc["error"]
    assert len(doc["changes"]) == doc["changed"] == 2 * pages


def test_table_status_columns_have_fixed_widths(capsys: pytest.CaptureFixture[str]) -> None:
    out = _ChangeOutput(CFG, as_json=False, dry_run=False)
    out.write([change(7)])
    out.write([change(123456789)])
    out.finish({"checked": 2, "changed": 2, "duration_seconds": 0.01})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["JOB_ID", "FROM", "TO", "REASON", "ERROR"]
    assert lines[1].index("running") == lines[0].index("FROM")
    assert lines[1].index("completed") == lines[0].index("TO")
    assert lines[2].split()[0] == "123456789"
    assert lines[-1] == "checked 2 active rows, changed 2 in 0.01 s"


def _page(first: int, n: int) -> PassReport:
    return PassReport(changes=[change(first + i) for i in range(n)],
                      horse_stops=[HorseStop(first + i, f"rq-{first + i}", "w1", "orphan")
                                   for i in range(n)],
                      rq_cancels=[f"rq-{first + i}" for i in range(n)])


async def test_json_horse_stops_and_rq_cancels_wait_on_disk_not_in_memory(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Pages hand their horse stops and RQ cancels over as they are applied; the summary
    lists them all at the end. Past a megabyte they wait in a temporary file."""
    out = _ChangeOutput(CFG, as_json=True, dry_run=False)
    for p in range(20):
        await out.page(_page(1000 * p, 1000))
    assert out._horse_stops._file._rolled  # 20,000 entries: spilled to a file
    out.finish({"checked": 20_000, "changed": 20_000})
    doc = json.loads(capsys.readouterr().out)
    want = [f"rq-{1000 * p + i}" for p in range(20) for i in range(1000)]
    assert [h["rq_id"] for h in doc["horse_stops"]] == want
    assert doc["rq_cancels"] == want
    assert [c["job_id"] for c in doc["changes"]] == [str(int(w[3:])) for w in want]


async def test_table_notes_follow_the_changes(capsys: pytest.CaptureFixture[str]) -> None:
    out = _ChangeOutput(CFG, as_json=False, dry_run=False)
    await out.page(_page(1, 2))
    await out.page(PassReport())
    out.finish({"checked": 2, "changed": 2, "duration_seconds": 0.01})
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:3]] == ["JOB_ID", "1", "2"]
    assert lines[3:5] == [
        "note: job 1 (rq-1) has a horse to stop on worker w1: orphan (the daemon does this)",
        "note: job 2 (rq-2) has a horse to stop on worker w1: orphan (the daemon does this)"]
    assert lines[-1] == "checked 2 active rows, changed 2 in 0.01 s"

