"""Every `lorakit data` command in docs/DATA.md runs as written (from the repository root) and exits 0."""
from __future__ import annotations

import functools
import shlex
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.loading.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [line.strip() for line in (ROOT / "docs" / "DATA.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("    lorakit data ")]


def test_the_doc_has_commands_for_every_form():
    text = " ".join(COMMANDS)
    for form in ("alpaca.jsonl", "chat.jsonl", "sharegpt.jsonl", "notes.txt", "qa.csv", "qa.parquet"):
        assert form in text


@pytest.mark.parametrize("command", COMMANDS)
def test_doc_command_runs(command, monkeypatch, capsys):
    pytest.importorskip("datasets")
    import lorakit.loading.tokenizer as tl
    monkeypatch.setattr(tl, "load_tokenizer", _cached_tokenizer)  # the same tokenizer, read once for all commands
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)[1:]
    assert main(argv) == 0, capsys.readouterr().err
    assert "rows " in capsys.readouterr().out


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(spec=None, trust_remote_code=False):
    return load_tokenizer(spec, trust_remote_code=trust_remote_code)
