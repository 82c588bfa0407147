"""lorakit.rank and `lorakit rank`: checked against numpy's SVD of the dense update on factors of known rank."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.analysis import spectrum as R
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError

PREFIX = "base_model.model."


def known_factors(d: int, k: int, r: int, s, seed: int = 0, in_shape: tuple[int, ...] | None = None):
    """Returns (A, B) in float64 with B @ A = U diag(s) V^T exactly (rank len(s) <= r), mixed by a random r x r."""
    g = torch.Generator().manual_seed(seed)
    t = len(s)
    U = torch.linalg.qr(torch.randn(d, t, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(k, t, generator=g, dtype=torch.float64))[0]
    B = torch.cat([U * torch.tensor(s, dtype=torch.float64), torch.zeros(d, r - t, dtype=torch.float64)], 1)
    A = torch.cat([V.T, torch.randn(r - t, k, generator=g, dtype=torch.float64)], 0)  # extra rows meet B's zeros
    M = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    return torch.linalg.solve(M, A).reshape(r, *(in_shape or (k,))), B @ M


def dense(A, B, scale=1.0):
    """Returns scale * B @ A as a numpy matrix, flattening conv factors."""
    return scale * (B.reshape(B.shape[0], B.shape[1]).double() @ A.reshape(A.shape[0], -1).double()).numpy()


def close_to(got, want, tol=1e-5):
    """Returns True when got matches want to `tol` relative to the largest value of want."""
    want = np.asarray(want, dtype=np.float64)
    return np.max(np.abs(np.asarray(got, dtype=np.float64) - want)) <= tol * max(np.max(np.abs(want)), 1e-30)


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("d,k,r,s", [(40, 24, 8, [5.0, 3.0, 2.0, 0.5, 0.1]), (64, 48, 16, [1.0] * 16),
                                     (6, 5, 8, [2.0, 1.0])])  # r > k and r > d: fewer than r values
def test_spectrum_matches_dense_svd(d, k, r, s):
    A, B = known_factors(d, k, r, s, seed=d)
    got = R.singular_values(A, B, scale=0.75)
    want = np.linalg.svd(dense(A, B, 0.75), compute_uv=False)
    assert got.shape[0] == min(d, k, r)
    assert close_to(got, want[: got.shape[0]])
    assert close_to(got[: len(s)], 0.75 * np.array(s))


def test_spectrum_of_random_float32_and_conv_factors():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, 300, generator=g), torch.randn(500, 8, generator=g)
    assert close_to(R.singular_values(A, B, 2.0), np.linalg.svd(dense(A, B, 2.0), compute_uv=False)[:8])
    A, B = torch.randn(4, 3, 3, 3, generator=g), torch.randn(6, 4, 1, 1, generator=g)
    assert close_to(R.singular_values(A, B), np.linalg.svd(dense(A, B), compute_uv=False)[:4])


def test_singular_vectors_reconstruct_the_update():
    A, B = known_factors(30, 20, 6, [4.0, 2.0, 1.0], seed=3)
    U, S, Vh = R.factor_svd(A, B, -1.5)  # a negative scale goes into U, singular values stay positive
    assert (S >= 0).all()
    assert close_to((U * S) @ Vh, dense(A, B, -1.5))
    assert close_to(U.T @ U, np.eye(S.numel()), 1e-10) and close_to(Vh @ Vh.T, np.eye(S.numel()), 1e-10)


def test_effective_rank_is_exact_for_exact_rank_updates():
    # energies 64, 16, 4, 1 of 85: cumulative 0.753, 0.941, 0.988, 1.0
    A, B = known_factors(40, 30, 8, [8.0, 4.0, 2.0, 1.0], seed=4)
    s = R.singular_values(A, B)
    assert [R.effective_rank(s, e) for e in (0.5, 0.9, 0.95, 0.98, 0.99, 1.0)] == [1, 2, 3, 3, 4, 4]
    assert R.stable_rank(s) == pytest.approx(85 / 64, rel=1e-10)
    for true_rank in (1, 3, 8):
        A, B = known_factors(40, 30, 8, [1.0] * true_rank, seed=true_rank)
        s = R.singular_values(A, B)
        assert R.effective_rank(s, 1.0) == true_rank
        assert R.effective_rank(s, 0.9) == math.ceil(0.9 * true_rank)
        assert R.stable_rank(s) == pytest.approx(true_rank, rel=1e-10)


def test_edge_cases_of_effective_and_stable_rank():
    zero = R.singular_values(torch.randn(4, 10), torch.zeros(12, 4))  # B starts at zero: no update yet
    assert R.effective_rank(zero, 0.9) == 0 and R.stable_rank(zero) == 0.0
    assert R.rank_pattern({"a": zero, "b": torch.tensor([3.0, 1.0])}, 0.99) == {"a": 1, "b": 2}
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ConfigError):
            R.effective_rank(torch.ones(3), bad)


@pytest.mark.parametrize("rank", [3, 4, 8, 20])
def test_compression_to_at_least_the_true_rank_is_lossless(rank):
    A, B = known_factors(40, 30, 8, [8.0, 4.0, 2.0], seed=5)
    A2, B2, err = R.truncate(A, B, rank, scale=2.0, new_scale=0.5)
    assert A2.shape == (min(rank, 8), 30) and B2.shape == (40, min(rank, 8))
    assert err < 1e-7
    assert close_to(dense(A2, B2, 0.5), dense(A, B, 2.0))


def test_compression_below_the_true_rank_loses_exactly_the_discarded_energy():
    s = [8.0, 4.0, 2.0, 1.0, 0.5]
    A, B = known_factors(40, 30, 8, s, seed=6)
    total = sum(v * v for v in s)
    for rank in (1, 2, 4):
        A2, B2, err = R.truncate(A, B, rank, scale=1.0)
        want = math.sqrt(sum(v * v for v in s[rank:]) / total)
        assert err == pytest.approx(want, rel=1e-9)
        full = dense(A, B)
        assert np.linalg.norm(dense(A2, B2) - full) / np.linalg.norm(full) == pytest.approx(want, rel=1e-6)
        assert close_to(R.singular_values(A2, B2), s[:rank])
    with pytest.raises(ConfigError):
        R.truncate(A, B, 0)


def test_truncation_keeps_conv_shapes_and_dtype():
    A, B = known_factors(6, 27, 5, [3.0, 1.0], seed=7, in_shape=(3, 3, 3))
    B = B.reshape(6, 5, 1, 1)
    A2, B2, err = R.truncate(A.float(), B.float(), 2)
    assert A2.shape == (2, 3, 3, 3) and B2.shape == (6, 2, 1, 1) and A2.dtype == torch.float32
    assert err < 1e-6 and close_to(dense(A2, B2), dense(A, B))


def test_phi_is_one_for_identical_and_zero_for_orthogonal_subspaces():
    A1, B1 = known_factors(20, 16, 4, [4.0, 3.0, 2.0, 1.0], seed=8)
    assert torch.allclose(R.update_similarity(A1, B1, A1, B1), torch.ones(4, 4, dtype=torch.float64))
    # same row space, different B: still the same input subspace at full rank
    assert R.similarity_summary(R.update_similarity(A1, B1, A1, torch.randn(20, 4, dtype=torch.float64))) \
        == pytest.approx(1.0)
    eye = torch.eye(16, dtype=torch.float64)
    Ba, Bb = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    grid = R.update_similarity(eye[:4], Ba, eye[4:12], Bb)  # inputs 0-3 vs inputs 4-11
    assert grid.shape == (4, 8) and grid.abs().max() < 1e-12
    # a 2-dim subspace inside a 4-dim one: phi(i, j) = 1 once the larger one is complete
    assert R.update_similarity(eye[:2], Ba[:, :2], eye[:4], Ba)[1, 3] == pytest.approx(1.0)


def test_phi_grid_matches_the_definition():
    g = torch.Generator().manual_seed(9)
    V1 = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    V2 = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64))[0]
    grid = R.subspace_similarity(V1, V2)
    for i in range(1, 4):
        for j in range(1, 6):
            want = torch.linalg.norm(V1[:, :i].T @ V2[:, :j]) ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(float(want), rel=1e-12)
    assert R.similarity_summary(grid) == pytest.approx(float(grid[2, 2]))
    assert R.similarity_summary(grid, 2) == pytest.approx(float(grid[1, 1]))
    assert R.similarity_summary(grid, 0) == pytest.approx(float(grid[0, 0]))  # m is clamped to [1, min(r1, r2)]


def test_grouping_of_peft_keys():
    t = {
        PREFIX + "model.layers.0.q.lora_A.weight": torch.zeros(2, 5),
        PREFIX + "model.layers.0.q.lora_B.weight": torch.zeros(3, 2),
        PREFIX + "model.embed.lora_embedding_A": torch.zeros(2, 50),
        PREFIX + "model.embed.lora_embedding_B": torch.zeros(4, 2),
        PREFIX + "model.conv.lora_A.weight": torch.zeros(2, 3, 3, 3),
        PREFIX + "model.conv.lora_B.weight": torch.zeros(6, 2, 1, 1),
        PREFIX + "model.layers.0.q.lora_magnitude_vector": torch.zeros(3),  # DoRA: not a factor
        PREFIX + "lm_head.weight": torch.zeros(7, 5),  # modules_to_save: not a factor
    }
    groups = R.group_factors(t)
    assert sorted(groups) == ["model.conv", "model.embed", "model.layers.0.q"]
    assert groups["model.embed"][0].shape == (2, 50) and groups["model.conv"][1].shape == (6, 2, 1, 1)
    assert sorted(R.natural_key(m) for m in ["l.10", "l.2", "l.1"]) == [["l.", 1, ""], ["l.", 2, ""], ["l.", 10, ""]]
    del t[PREFIX + "model.conv.lora_B.weight"]
    with pytest.raises(AdapterFileError, match="model.conv"):
        R.group_factors(t)


# ---------------------------------------------------------------- CLI

SPECTRA = {  # module -> singular values of B @ A (before the scale alpha/r = 16/8 = 2)
    "model.layers.0.q": [8.0, 4.0, 2.0, 1.0],
    "model.layers.1.q": [1.0, 1.0],
    "model.layers.2.q": [5.0],
    "model.layers.10.q": [3.0, 2.0, 1.0, 1.0, 1.0, 1.0],
}
SCALE = 2.0


def write_adapter_by_hand(directory: Path, spectra=SPECTRA, seed: int = 0, r: int = 8) -> Path:
    """Returns `directory` after writing a PEFT-format adapter with the given spectra (d=24, k=16, r, alpha=2r)."""
    directory.mkdir(parents=True)
    tensors = {}
    for n, (m, s) in enumerate(spectra.items()):
        A, B = known_factors(24, 16, r, s, seed=seed + n)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B.float().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": r, "lora_alpha": 2 * r,
              "lora_dropout": 0.0, "target_modules": ["q"], "bias": "none", "use_rslora": False,
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
              "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def run_cli(capsys, *argv):
    """Returns (exit status, stdout, stderr) of `lorakit rank ...` run in-process."""
    status = main(["rank", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_json_parses_and_matches(tmp_path, capsys):
    adapter = write_adapter_by_hand(tmp_path / "a")
    status, out, err = run_cli(capsys, adapter, "--json")
    assert status == 0, err
    report = json.loads(out)  # ONE object, nothing else on stdout
    assert list(report) == ["model.layers.0.q", "model.layers.1.q", "model.layers.2.q", "model.layers.10.q"]
    for m, s in SPECTRA.items():
        row = report[m]
        assert set(row) == {"singular_values", "effective_rank_90", "effective_rank_99", "stable_rank"}
        assert len(row["singular_values"]) == 8
        assert close_to(row["singular_values"], [SCALE * v for v in s] + [0.0] * (8 - len(s)))
        e = np.cumsum(np.square(s)) / np.sum(np.square(s))
        assert row["effective_rank_90"] == int(np.searchsorted(e, 0.9 - 1e-12) + 1)
        assert row["effective_rank_99"] == int(np.searchsorted(e, 0.99 - 1e-12) + 1)
        assert row["stable_rank"] == pytest.approx(sum(v * v for v in s) / s[0] ** 2, rel=1e-5)
    assert not (adapter / "rank_spectra.png").exists()  # --json writes no plot unless asked


def test_cli_table_plot_and_recommendation(tmp_path, capsys):
    adapter = write_adapter_by_hand(tmp_path / "a")
    status, out, err = run_cli(capsys, adapter, "--energy", "0.99")
    assert status == 0, err
    assert out.index("model.layers.2.q") < out.index("model.layers.10.q")  # layer order, not string order
    assert '{"model.layers.0.q": 4, "model.layers.1.q": 2, "model.layers.2.q": 1, "model.layers.10.q": 6}' in out
    assert (adapter / "rank_spectra.png").read_bytes()[:4] == b"\x89PNG"
    status, out, err = run_cli(capsys, adapter, "--plot", tmp_path / "plots" / "s.png")
    assert status == 0 and (tmp_path / "plots" / "s.png").exists()


def read_back(directory: Path):
    """Returns (adapter_config.json dict, {module: (A, B)}) read straight from the files."""
    return (json.loads((directory / "adapter_config.json").read_text()),
            R.group_factors(load_file(str(directory / "adapter_model.safetensors"))))


def test_cli_compress_to_rank_writes_rank_pattern_and_errors(tmp_path, capsys):
    adapter = write_adapter_by_hand(tmp_path / "a")
    status, out, err = run_cli(capsys, adapter, "--compress", 3, "--out", tmp_path / "c", "--json")
    assert status == 0, err
    errors = json.loads(out)
    config, factors = read_back(tmp_path / "c")
    assert config["rank_pattern"] == {m: 3 for m in SPECTRA}
    assert config["lora_alpha"] == 16 and config["r"] == 8
    for m, s in SPECTRA.items():
        want = math.sqrt(sum(v * v for v in s[3:]) / sum(v * v for v in s))
        assert errors[m]["new_r"] == 3 and errors[m]["relative_error"] == pytest.approx(want, abs=1e-6)
        A, B = factors[m]
        assert A.shape == (3, 16) and B.shape == (24, 3)
        new_scale = 16 / 3  # alpha / new rank: the factors absorb the change of scale
        _, old = read_back(adapter)
        if len(s) <= 3:  # lossless
            assert close_to(dense(A, B, new_scale), dense(*old[m], SCALE))
    # the table form prints each module's relative error and where it wrote
    status, out, err = run_cli(capsys, adapter, "--compress", 2)
    assert status == 0, err
    assert "model.layers.10.q" in out and (tmp_path / "a-r2" / "adapter_config.json").exists()


def test_cli_compress_by_energy(tmp_path, capsys):
    adapter = write_adapter_by_hand(tmp_path / "a")
    status, out, err = run_cli(capsys, adapter, "--energy", "0.99", "--out", tmp_path / "e")
    assert status == 0, err
    config, factors = read_back(tmp_path / "e")
    want = {"model.layers.0.q": 4, "model.layers.1.q": 2, "model.layers.2.q": 1, "model.layers.10.q": 6}
    assert config["rank_pattern"] == want
    assert {m: A.shape[0] for m, (A, B) in factors.items()} == want


def test_compressed_adapter_loads_in_peft_with_the_truncated_update(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    adapter = write_adapter_by_hand(tmp_path / "a", {"layers.0.q": [4.0, 2.0], "layers.1.q": [3.0, 2.0, 1.0]})
    status, out, err = run_cli(capsys, adapter, "--compress", 2, "--out", tmp_path / "c")
    assert status == 0, err

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(16, 24)}) for _ in range(2))

    model = peft.PeftModel.from_pretrained(Tiny(), str(tmp_path / "c"))
    _, old = read_back(adapter)
    for i, s in enumerate([[4.0, 2.0], [3.0, 2.0, 1.0]]):
        lora = model.base_model.model.layers[i]["q"]
        assert lora.r["default"] == 2
        U, S, Vh = np.linalg.svd(dense(*old[f"layers.{i}.q"], SCALE))
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        assert close_to(lora.get_delta_weight("default").detach().double().numpy(), best)


def test_cli_compare_writes_heatmaps_and_summaries(tmp_path, capsys):
    a = write_adapter_by_hand(tmp_path / "a")
    b = write_adapter_by_hand(tmp_path / "b", seed=100)
    status, out, err = run_cli(capsys, "compare", a, a, "--out-dir", tmp_path / "same", "--json")
    assert status == 0, err
    same = json.loads(out)
    assert list(same) == list(SPECTRA)
    # m = the smaller effective rank at 99% energy: the summary ignores directions that hold no energy
    assert [row["m"] for row in same.values()] == [4, 2, 1, 6]
    assert all(row["summary"] == pytest.approx(1.0) and row["phi_1_1"] == pytest.approx(1.0) for row in same.values())
    status, out, err = run_cli(capsys, "compare", a, b, "--module", "model.layers.0.q", "--module",
                               "model.layers.2.q", "--out-dir", tmp_path / "ab")
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["model.layers.0.q.png", "model.layers.2.q.png"]
    assert (tmp_path / "ab" / "model.layers.0.q.png").read_bytes()[:4] == b"\x89PNG"
    assert "phi(m,m)" in out


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/missing"], "does not exist"),
    (["{tmp}/a", "--compress", "0"], "--compress must be a rank of at least 1"),
    (["{tmp}/a", "--energy", "1.5"], "energy must be in (0, 1]"),
    (["{tmp}/a", "--compress", "2", "--energy", "0.9"], "either --compress R or --energy E"),
    (["{tmp}/a", "--compress", "2", "--out", "{tmp}/a"], "--out must differ"),
    (["{tmp}/a", "{tmp}/a"], "takes one ADAPTER_DIR"),
    (["compare", "{tmp}/a"], "usage: lorakit rank compare DIR_A DIR_B"),
    (["compare", "{tmp}/a", "{tmp}/a", "--module", "model.layers.0.k"], "Did you mean: model.layers.0.q"),
    (["{tmp}/a/adapter_config.json"], "is a file"),
    (["{tmp}/empty"], "not an adapter folder"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    write_adapter_by_hand(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    status, out, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert status == 2
    assert err.startswith("lorakit rank: error: ") and err.count("\n") == 1, err
    assert message in err


def test_compress_round_trips_through_lorakit_save_and_load(tmp_path, capsys):
    from lorakit import LoraConfig, inject, load_adapter, merge_and_unload, save_adapter

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(30, 12)
            self.conv = torch.nn.Conv2d(3, 5, 3)
            self.proj = torch.nn.Linear(12, 10)

    torch.manual_seed(0)
    base = Tiny()
    model = inject(copy.deepcopy(base).requires_grad_(False),
                   LoraConfig(r=6, lora_alpha=12, target_modules=["embed", "conv", "proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()  # B starts at zero; give every module a real update
    save_adapter(model, tmp_path / "a")
    full = {n: p.detach().double() for n, p in merge_and_unload(model).named_parameters()}
    status, out, err = run_cli(capsys, tmp_path / "a", "--compress", 2, "--out", tmp_path / "c", "--json")
    assert status == 0, err
    assert sorted(json.loads(out)) == ["conv", "embed", "proj"]
    small = merge_and_unload(load_adapter(copy.deepcopy(base), tmp_path / "c"))
    for name, p in base.named_parameters():
        if name.endswith("bias"):
            continue
        delta = (full[name] - p.detach().double()).reshape(p.shape[0], -1).numpy()
        U, S, Vh = np.linalg.svd(delta, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        got = (dict(small.named_parameters())[name].detach().double() - p.detach().double()).reshape(p.shape[0], -1)
        assert close_to(got.numpy(), best, 1e-4), name
