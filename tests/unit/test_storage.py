"""Durable writes: unique temporary files, fsync of the file and of its directory."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from medsplit import storage
from medsplit.storage import atomic_write


def test_a_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "report.json"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["report.json"]


def test_the_file_and_its_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    atomic_write(tmp_path / "w.safetensors", b"x" * 10)
    assert synced == ["file", "dir"]  # the data first, then the rename that publishes it


def test_concurrent_writers_of_one_path_never_share_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "edge.safetensors"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            for _ in range(20):
                atomic_write(target, data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert target.read_bytes() in payloads  # whole, never a mix of two writers
    assert os.listdir(tmp_path) == ["edge.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.onnx"
    atomic_write(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]
