"""What the hardware reports: the last-level cache size from sysfs."""

from __future__ import annotations

from pathlib import Path

from scratchgpt.device import last_level_cache_bytes


def _cache(root: Path, index: int, *, level: int, kind: str, size: str) -> None:
    d = root / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_last_level_cache_is_the_highest_data_level(tmp_path: Path) -> None:
    _cache(tmp_path, 0, level=1, kind="Data", size="48K")
    _cache(tmp_path, 1, level=1, kind="Instruction", size="32K")
    _cache(tmp_path, 2, level=2, kind="Unified", size="2048K")
    _cache(tmp_path, 3, level=3, kind="Unified", size="266240K")  # a 260 MB Xeon L3
    assert last_level_cache_bytes(tmp_path) == 266240 * 1024
    _cache(tmp_path, 4, level=4, kind="Instruction", size="1G")  # not a data cache: ignored
    assert last_level_cache_bytes(tmp_path) == 266240 * 1024


def test_last_level_cache_unknown_is_none(tmp_path: Path) -> None:
    assert last_level_cache_bytes(tmp_path / "missing") is None
    _cache(tmp_path, 0, level=2, kind="Unified", size="lots")
    assert last_level_cache_bytes(tmp_path) is None
    _cache(tmp_path, 1, level=3, kind="Unified", size="32M")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
