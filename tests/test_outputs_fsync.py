"""atomic_dir fsyncs every file and directory of an item's tree, at any depth.

Real files; ``os.fsync`` is only observed (then called for real), by the path
of the descriptor it is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpipe import outputs


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _write_tree(tmp: Path, outside: Path) -> None:
    (tmp / "top.npy").write_bytes(b"top")
    (tmp / "sub" / "deeper").mkdir(parents=True)
    (tmp / "sub" / "nested.npy").write_bytes(b"nested")
    (tmp / "sub" / "deeper" / "x.bin").write_bytes(b"x")
    # Symlinks out of the tree: what they point to is not the item's output.
    (tmp / "sub" / "link-file").symlink_to(outside / "target.bin")
    (tmp / "sub" / "link-dir").symlink_to(outside)


def _outside_and_final(tmp_path: Path) -> tuple[Path, Path]:
    """A directory outside the item's tree, with a file symlinks point at; the
    item's final directory."""
    base = tmp_path.resolve()
    outside = base / "outside"
    outside.mkdir()
    (outside / "target.bin").write_bytes(b"not ours")
    return outside, base / "out" / "item-1"


def test_fsync_reaches_nested_files_and_directories(tmp_path: Path, synced: list[str]) -> None:
    outside, final = _outside_and_final(tmp_path)

    with outputs.atomic_dir(final, fsync=True) as tmp:
        _write_tree(tmp, outside)
        rels = ["", "top.npy", "sub", "sub/nested.npy", "sub/deeper", "sub/deeper/x.bin"]
        expected = {str(tmp / rel) if rel else str(tmp) for rel in rels}

    assert expected <= set(synced), sorted(expected - set(synced))
    assert str(final.parent) in synced  # the directory holding the rename
    assert str(outside) not in synced
    assert str(outside / "target.bin") not in synced
    # Bottom-up: each directory after everything inside it.
    order = {path: i for i, path in enumerate(synced)}
    assert order[str(tmp / "sub" / "deeper" / "x.bin")] < order[str(tmp / "sub" / "deeper")]
    assert order[str(tmp / "sub" / "nested.npy")] < order[str(tmp / "sub")]
    assert order[str(tmp / "sub")] < order[str(tmp)]
    # Published whole.
    assert (final / "sub" / "deeper" / "x.bin").read_bytes() == b"x"
    assert (final / "sub" / "nested.npy").read_bytes() == b"nested"


def test_no_fsync_when_off(tmp_path: Path, synced: list[str]) -> None:
    outside, final = _outside_and_final(tmp_path)

    with outputs.atomic_dir(final, fsync=False) as tmp:
        _write_tree(tmp, outside)

    assert synced == []
    assert (final / "sub" / "deeper" / "x.bin").read_bytes() == b"x"
