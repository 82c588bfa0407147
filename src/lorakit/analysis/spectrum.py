"""What rank did an adapter really use? Spectra, effective rank, truncation and subspace similarity.

Every function here works on the LoRA factors of one module and never forms the d x k update:

    delta_W = scale * B @ A          A: r x k, B: d x r
            = scale * (Q_B R_B) (Q_A R_A)^T        B = Q_B R_B,  A^T = Q_A R_A   (reduced QR)
            = scale * Q_B (R_B R_A^T) Q_A^T        R_B R_A^T is only r x r
            = Q_B U_m  (scale * S)  (Q_A V_m)^T    SVD of the small r x r core

so the cost is O((d + k) r^2) instead of O(d k min(d, k)). Conv factors are flattened first
(A: r x in x kh x kw -> r x (in*kh*kw), B: d x r x 1 x 1 -> d x r); embedding factors are used as stored
(A: r x num_embeddings, B: dim x r; PEFT applies the transpose of B @ A, which has the same spectrum).

Everything is computed in float64 on the CPU: spectra are small and the tail values are what users read.
"""
from __future__ import annotations

import math
import re

import torch

from lorakit.errors import AdapterFileError, ConfigError

# Cumulative energy this close below a threshold counts as reaching it, so that rounding noise in the
# tail of an exact-rank update (relative energy ~1e-30) cannot add phantom directions at energy=1.0.
ENERGY_TOLERANCE = 1e-12

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?:(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight|(?P<emb>lora_embedding_[AB])(?:\.[^.]+)?)$"
)


def lora_keys(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Returns {module name: (key of A, key of B)} for every LoRA module in PEFT-keyed `tensors`.

    Module names drop the `base_model.model.` prefix. Keys that are not LoRA factors (DoRA magnitudes,
    modules_to_save copies, lora biases) are ignored; a module with only one of its two factors raises.
    """
    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _KEY.match(key)
        if m is None:
            continue
        which = (m.group("ab") or m.group("emb"))[-1]  # "A" or "B"
        found.setdefault(m.group("module"), {})[which] = key
    out = {}
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterFileError(f"module {module!r} has no {missing} tensor; the adapter file is incomplete")
        out[module] = (pair["A"], pair["B"])
    return out


def group_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Returns {module name: (A, B)} from PEFT-keyed `tensors` (see `lora_keys`)."""
    return {module: (tensors[ka], tensors[kb]) for module, (ka, kb) in lora_keys(tensors).items()}


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (A as r x k, B as d x r) in float64, flattening conv factors; raises if the ranks disagree."""
    if A.dim() < 2 or B.dim() < 2:
        raise AdapterFileError(f"LoRA factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if any(n != 1 for n in B.shape[2:]):
        raise AdapterFileError(f"conv lora_B must have 1 x 1 kernels, got shape {tuple(B.shape)}")
    A2 = A.detach().to("cpu", torch.float64).reshape(A.shape[0], -1)
    B2 = B.detach().to("cpu", torch.float64).reshape(B.shape[0], B.shape[1])
    if A2.shape[0] != B2.shape[1]:
        raise AdapterFileError(f"LoRA factors disagree on the rank: A {tuple(A.shape)} has r={A2.shape[0]}, "
                               f"B {tuple(B.shape)} has r={B2.shape[1]}")
    return A2, B2


def factor_svd(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (U, S, Vh) of scale * B @ A from the factors: U d x m, S (m,) descending, Vh m x k, m = min(d, r, k)."""
    A2, B2 = as_matrices(A, B)
    Q_B, R_B = torch.linalg.qr(B2)       # d x m_b, m_b x r
    Q_A, R_A = torch.linalg.qr(A2.T)     # k x m_a, m_a x r
    U_m, S, Vh_m = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    U = Q_B @ U_m
    Vh = Vh_m @ Q_A.T
    if scale < 0:  # keep singular values non-negative; the sign goes into U
        U = -U
    return U, S * abs(scale), Vh


def singular_values(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Returns the singular values of scale * B @ A (float64, descending, min(d, r, k) of them)."""
    return factor_svd(A, B, scale)[1]


def check_energy(energy: float) -> None:
    """Returns None; raises ConfigError unless 0 < energy <= 1."""
    if not (0.0 < energy <= 1.0) or math.isnan(energy):
        raise ConfigError(f"energy must be in (0, 1], got {energy}")


def effective_rank(s: torch.Tensor, energy: float = 0.9) -> int:
    """Returns the smallest i with s[0]^2 + ... + s[i-1]^2 >= energy * sum(s^2); 0 for an all-zero update.

    `s` are singular values in descending order and `energy` is in (0, 1]; energy=1.0 gives the numerical
    rank (directions holding less than ENERGY_TOLERANCE of the energy do not count).
    """
    check_energy(energy)
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    fraction = torch.cumsum(e, 0) / total
    return int((fraction < energy - ENERGY_TOLERANCE).sum()) + 1


def stable_rank(s: torch.Tensor) -> float:
    """Returns ||delta_W||_F^2 / ||delta_W||_2^2 = sum(s^2) / max(s)^2, a smooth rank in [1, r]; 0.0 if all zero."""
    s = s.to(torch.float64)
    top = float(s.abs().max()) if s.numel() else 0.0
    return float((s ** 2).sum()) / top ** 2 if top > 0 else 0.0


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int, scale: float = 1.0,
             new_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns (A', B', relative error) with new_scale * B' @ A' the best rank-`rank` approximation of scale * B @ A.

    The relative Frobenius error is sqrt(discarded energy / total energy) (0.0 for an all-zero update).
    `new_scale` defaults to `scale`; pass the new module's alpha/r when the rank change changes the scale.
    A rank above min(d, r, k) keeps all min(d, r, k) directions. The singular values are split evenly
    (sqrt on each side) so neither factor dwarfs the other. A' and B' keep A's and B's dtype and conv shape.
    """
    if rank < 1:
        raise ConfigError(f"rank must be at least 1, got {rank}")
    new_scale = scale if new_scale is None else new_scale
    if new_scale == 0:
        raise ConfigError("new_scale must be nonzero")
    U, S, Vh = factor_svd(A, B, scale)
    R = min(rank, S.numel())
    e = S ** 2
    total = float(e.sum())
    error = math.sqrt(max(float(e[R:].sum()), 0.0) / total) if total > 0 else 0.0
    root = torch.sqrt(S[:R] / abs(new_scale))
    sign = 1.0 if new_scale > 0 else -1.0
    B_new = (sign * U[:, :R] * root).reshape(B.shape[0], R, *B.shape[2:]).to(B.dtype)
    A_new = (root[:, None] * Vh[:R]).reshape(R, *A.shape[1:]).to(A.dtype)
    return A_new, B_new, error


def subspace_similarity(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """Returns the grid phi[i-1, j-1] = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j) for orthonormal columns V1, V2.

    phi is the normalized subspace similarity of the LoRA paper (Hu et al. 2021, section 7): 1 when the
    smaller subspace lies inside the larger one, 0 when they are orthogonal. V1 is k x r1, V2 is k x r2;
    the grid is r1 x r2 (float64).
    """
    if V1.shape[0] != V2.shape[0]:
        raise AdapterFileError(f"cannot compare subspaces of different dimensions: {V1.shape[0]} and {V2.shape[0]}")
    overlap = (V1.to(torch.float64).T @ V2.to(torch.float64)) ** 2
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = sum over the top-i x top-j block
    i = torch.arange(1, V1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, V2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def update_similarity(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """Returns the phi grid (r1 x r2) over the right singular vectors of the updates B1 @ A1 and B2 @ A2.

    Right singular vectors span the input space (the row space of A), as the paper compares; unlike the
    paper, which takes the SVD of A alone, they are ordered by the singular values of the whole update, so
    that "top-i directions" means the directions that change the output most. Scales do not matter.
    """
    V1 = factor_svd(A1, B1)[2].T
    V2 = factor_svd(A2, B2)[2].T
    return subspace_similarity(V1, V2)


def similarity_summary(grid: torch.Tensor, m: int | None = None) -> float:
    """Returns phi(m, m): the share of one update's top-m input directions lying in the other's top-m.

    `m` defaults to min(r1, r2). Pass the smaller effective rank of the two updates to leave out directions
    that carry no energy: past its numerical rank an update's singular vectors are arbitrary, and two random
    m-dim subspaces of a k-dim space already score about m / k.
    """
    m = min(grid.shape) if m is None else max(1, min(m, *grid.shape))
    return float(grid[m - 1, m - 1]) if min(grid.shape) else 0.0


def rank_pattern(spectra: dict[str, torch.Tensor], energy: float = 0.9) -> dict[str, int]:
    """Returns {module: rank} keeping `energy` of each module's update energy, at least 1 (PEFT needs r >= 1)."""
    return {module: max(1, effective_rank(s, energy)) for module, s in spectra.items()}


def natural_key(name: str) -> list:
    """Returns a sort key that orders 'layers.2' before 'layers.10' (layer order, not string order)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
