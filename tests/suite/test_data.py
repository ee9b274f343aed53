"""suite.data: group-disjoint seeded splits, split hashes, the build-once cache, seeded sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suite.data import EpochSeededSampler, cached, split_by_group, split_hash

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(0, 40), min_size=3, max_size=300), seed=st.integers(0, 2**31 - 1))
def test_split_by_group_is_disjoint_complete_and_non_empty(groups: list[int], seed: int) -> None:
    if len(set(groups)) < 3:
        with pytest.raises(ValueError, match="groups cannot fill"):
            split_by_group(groups, FRACTIONS, seed)
        return
    splits = split_by_group(groups, FRACTIONS, seed)
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(len(groups)))  # every item exactly once
    owners = [{groups[i] for i in idx} for idx in splits.values()]
    assert all(owners) and not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


def test_split_by_group_follows_fractions_and_seed() -> None:
    groups = np.repeat(np.arange(200), 5)  # 200 patients x 5 images
    a = split_by_group(groups, FRACTIONS, seed=0)
    sizes = {k: len(v) / len(groups) for k, v in a.items()}
    assert sizes == pytest.approx(FRACTIONS, abs=0.01)
    b = split_by_group(groups, FRACTIONS, seed=0)
    c = split_by_group(groups, FRACTIONS, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_group(groups, {"train": 0.8, "val": 0.1}, seed=0)


def test_split_hash_depends_on_content_not_order() -> None:
    assert split_hash([3, 1, 2]) == split_hash(np.array([1, 2, 3]))
    assert split_hash([1, 2, 3]) != split_hash([1, 2, 4])
    assert len(split_hash(["slide_a", "slide_b"])) == 16


def test_cached_builds_once_and_never_leaves_a_partial_file(tmp_path: Path) -> None:
    calls = []

    def build(path: Path) -> None:
        calls.append(path)
        path.write_text("data")

    target = tmp_path / "gen" / "set.txt"
    assert cached(target, build).read_text() == "data"
    cached(target, build)
    assert len(calls) == 1

    def broken(path: Path) -> None:
        path.write_text("half")
        raise KeyboardInterrupt

    other = tmp_path / "gen" / "other.txt"
    with pytest.raises(KeyboardInterrupt):
        cached(other, broken)
    assert not other.exists()


def test_epoch_seeded_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    s = EpochSeededSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert sorted(first) == list(range(50))
    t = EpochSeededSampler(50, seed=3)
    t.set_epoch(2)
    assert list(t) == first
    t.set_epoch(3)
    assert list(t) != first
    assert list(EpochSeededSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_cached_removes_a_failed_build_and_keeps_a_folder_another_process_finished_first(tmp_path: Path) -> None:
    def broken(path: Path) -> None:
        path.mkdir()
        (path / "half.npy").write_text("half")
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        cached(tmp_path / "gen" / "broken", broken)
    assert list((tmp_path / "gen").iterdir()) == []  # no temporary folder left behind

    target = tmp_path / "gen" / "set"

    def racing(path: Path) -> None:  # another rank renames its finished folder into place meanwhile
        target.mkdir()
        (target / "first.txt").write_text("first")
        path.mkdir()
        (path / "second.txt").write_text("second")

    assert cached(target, racing) == target
    assert [p.name for p in target.iterdir()] == ["first.txt"]
    assert [p.name for p in (tmp_path / "gen").iterdir()] == ["set"]
