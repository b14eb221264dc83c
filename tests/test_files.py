"""byol.files: a file appears under its name complete, or not at all."""
from __future__ import annotations

import pytest

from byol.files import atomic_path, atomic_write_text


def test_a_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "summary.json"  # the folder is created
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("every row\n")
    with pytest.raises(OSError, match="disk said no"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a ro")
            raise OSError("disk said no")
    assert target.read_text() == "every row\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_before_replace_runs_when_the_new_content_is_complete(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    seen = {}

    def rotate():  # e.g. last.pt -> previous.pt
        temps = list(tmp_path.glob(".last.pt.*.tmp"))
        seen["temp"], seen["target"] = temps[0].read_bytes(), target.read_bytes()
        target.rename(tmp_path / "previous.pt")

    with atomic_path(target, before_replace=rotate) as tmp:
        tmp.write_bytes(b"new state")
    assert seen == {"temp": b"new state", "target": b"old"}
    assert target.read_bytes() == b"new state" and (tmp_path / "previous.pt").read_bytes() == b"old"
