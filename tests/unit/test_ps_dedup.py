"""The shard's push de-duplication state and its durable log (sync durability), in process."""

from __future__ import annotations

import json
from pathlib import Path

from recps.ps import server
from recps.ps.server import _Dedup


def _dedup(d: Path, window: int = 8) -> _Dedup:
    return _Dedup(window, snapshot_path=d / "dedup.json", log_path=d / "dedup.log")


def _reopen(d: Path) -> _Dedup:
    """What a restarted shard does: the last snapshot, then the log's records."""
    again = _dedup(d)
    if (d / "dedup.json").exists():
        again.load(json.loads((d / "dedup.json").read_text()))
    again.replay_log()
    return again


def test_marks_survive_a_crash_through_the_log(tmp_path: Path) -> None:
    dd = _dedup(tmp_path)
    for seq in (1, 2):
        assert dd.begin("c", seq) == (True, None)
        dd.mark_table("c", seq, "only", log=False)  # the last table: finish() records it
        dd.finish("c", seq, True)
    # seq 3 crashed after its first table reached the WAL, before the second
    assert dd.begin("c", 3) == (True, None)
    dd.mark_table("c", 3, "a")
    # no close, no snapshot: the process died here
    again = _reopen(tmp_path)
    assert again.begin("c", 1) == (False, None)
    assert again.begin("c", 2) == (False, None)
    assert again.applied_tables("c", 3) == {"a"}
    assert again.begin("c", 3) == (True, None)  # the retry runs, skipping table a
    again.finish("c", 3, True)
    assert again.applied_tables("c", 3) == frozenset()
    assert _reopen(tmp_path).begin("c", 3) == (False, None)


def test_failed_push_keeps_its_applied_tables_for_the_retry(tmp_path: Path) -> None:
    dd = _Dedup(8)  # async shard: memory only
    dd.begin("c", 5)
    dd.mark_table("c", 5, "a")
    dd.finish("c", 5, False)  # table b failed
    assert dd.begin("c", 5) == (True, None)
    assert dd.applied_tables("c", 5) == {"a"}


def test_snapshot_empties_the_log_and_keeps_everything(tmp_path: Path) -> None:
    dd = _dedup(tmp_path)
    dd.begin("c", 1)
    dd.mark_table("c", 1, "a")
    dd.begin("c", 2)
    dd.finish("c", 2, True)
    dd.snapshot()
    assert (tmp_path / "dedup.log").read_bytes() == b""
    again = _reopen(tmp_path)
    assert again.applied_tables("c", 1) == {"a"}
    assert again.begin("c", 2) == (False, None)
    dd.begin("c", 3)
    dd.finish("c", 3, True)  # the log keeps working after a truncation
    assert _reopen(tmp_path).begin("c", 3) == (False, None)


def test_log_compacts_itself(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(server, "_LOG_COMPACT_BYTES", 200)
    dd = _dedup(tmp_path, window=1000)
    for seq in range(1, 50):
        dd.begin("client", seq)
        dd.finish("client", seq, True)
    assert (tmp_path / "dedup.log").stat().st_size <= 200 + 64
    again = _reopen(tmp_path)
    assert all(again.begin("client", s) == (False, None) for s in range(1, 50))


def test_torn_last_record_is_skipped(tmp_path: Path) -> None:
    dd = _dedup(tmp_path)
    dd.begin("c", 1)
    dd.finish("c", 1, True)
    with open(tmp_path / "dedup.log", "ab") as f:
        f.write(b'["d","c",')  # power loss mid-write
    again = _reopen(tmp_path)
    assert again.begin("c", 1) == (False, None)
    assert again.begin("c", 2) == (True, None)


def test_old_snapshots_without_partial_still_load(tmp_path: Path) -> None:
    dd = _Dedup(8)
    dd.load({"c": {"high": 4, "done": [3, 4]}})
    assert dd.begin("c", 4) == (False, None)
    assert dd.to_dict()["c"]["partial"] == {}
