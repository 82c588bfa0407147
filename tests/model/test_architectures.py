"""The architecture matrix (bench/architectures.py) as tests: every listed family against the real `peft`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "architectures.py"
_spec = importlib.util.spec_from_file_location("lorakit_bench_architectures", _PATH)
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)


@pytest.mark.parametrize("arch", matrix.ARCHITECTURES)
def test_architecture_matches_peft(arch):
    res = matrix.check(arch)
    failed = {c: res[c] for c in matrix.CHECKS if res[c]}
    assert not failed, f"{arch}: {failed}"


def test_matrix_command_reports_unknown_architecture(capsys):
    assert matrix.main(["no-such-arch"]) == 2
    assert "unknown architecture" in capsys.readouterr().out
