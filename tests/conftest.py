"""Fixtures shared by every test file: the real data folder and the GPT-2 tokenizer built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The repo's sibling ../shared/data, unless SCRATCHGPT_DATA_DIR points elsewhere.
DATA_DIR = Path(
    os.environ.get("SCRATCHGPT_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder (GPT-2 files, Tiny Shakespeare, ...); skips the test when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}; set SCRATCHGPT_DATA_DIR to the shared data folder")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_shakespeare(data_dir: Path) -> str:
    """The full Tiny Shakespeare text (1,115,394 characters)."""
    return (data_dir / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir: Path):
    """GPT-2's tokenizer from the local data folder, so no test ever downloads it."""
    # Imported here so that a broken tokenizer module fails its own tests, not every test file.
    from scratchgpt.tokenizer import GPT2Tokenizer

    return GPT2Tokenizer.from_dir(data_dir / "gpt2")


@pytest.fixture(autouse=True)
def _gpt2_files_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point GPT-2 file lookup at the local data, so code that resolves them never reaches the network."""
    gpt2_dir = DATA_DIR / "gpt2"
    if gpt2_dir.is_dir():
        monkeypatch.setenv("SCRATCHGPT_GPT2_DIR", str(gpt2_dir))
