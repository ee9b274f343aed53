"""notebooks/refresh.py: a refresh without --reuse starts its run from an empty folder."""

from __future__ import annotations

from notebooks import refresh


def test_prepare_run_empties_the_folder_unless_reused(tmp_path, monkeypatch):
    calls = []

    def fake_commands(meta, run):
        calls.append(sorted(p.name for p in run.rglob("*")) if run.exists() else None)
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / "last.ckpt").write_text("new")

    monkeypatch.setattr(refresh, "run_commands", fake_commands)
    run = tmp_path / "nuclei"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("old")  # an earlier run's checkpoint
    refresh.prepare_run({}, run)
    assert calls == [None]  # the commands saw no earlier files
    assert (run / "checkpoints" / "last.ckpt").read_text() == "new"
    refresh.prepare_run({}, run, reuse=True)  # kept as it is, the commands not run again
    assert calls == [None] and (run / "checkpoints" / "last.ckpt").read_text() == "new"
    refresh.prepare_run({}, tmp_path / "fresh", reuse=True)  # reuse with nothing there: runs them
    assert calls == [None, None]
