"""`lorakit rank`: see the rank an adapter really uses, compress it, and compare two adapters.

    lorakit rank ADAPTER_DIR [--energy E] [--plot PNG] [--json]     spectra table, plot, recommended rank_pattern
    lorakit rank ADAPTER_DIR --compress R [--out NEW_DIR]           truncate every module to rank <= R
    lorakit rank ADAPTER_DIR --energy E --out NEW_DIR               truncate each module to keep energy E
    lorakit rank compare DIR_A DIR_B [--module NAME ...] [--out-dir D] [--json]

argparse cannot hang a `compare` subcommand under a command that also takes a directory, so `rank` takes a
list of positionals and a first word `compare` selects the comparison (a directory named `compare` is
still reachable as `./compare`). The math lives in `lorakit.rank`; this module only reads, prints and plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from lorakit.analysis import spectrum as R
from lorakit.errors import AdapterFileError, ConfigError, did_you_mean

TOP_SHOWN = 3  # singular values shown per row of the table; --json has all of them


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Returns the `rank` parser after registering it on `subparsers`."""
    p = subparsers.add_parser(
        "rank", help="spectra, effective rank, compression and similarity of LoRA adapters",
        usage="%(prog)s ADAPTER_DIR [options]\n       %(prog)s compare DIR_A DIR_B [options]",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="ADAPTER_DIR", help="an adapter folder, or: compare DIR_A DIR_B")
    p.add_argument("--energy", type=float, default=None, metavar="E",
                   help="energy kept by the recommended / compressed ranks, in (0, 1] (default 0.9)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="PNG of the spectra (default ADAPTER_DIR/rank_spectra.png; with --json only if given)")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by module, nothing else")
    p.add_argument("--compress", type=int, default=None, metavar="R", help="write an adapter truncated to rank <= R")
    p.add_argument("--out", type=Path, default=None, metavar="NEW_DIR",
                   help="where the compressed adapter goes (default ADAPTER_DIR-rR); with --energy alone it "
                        "compresses by energy")
    p.add_argument("--module", action="append", default=None, metavar="NAME",
                   help="compare: only this module (repeatable; default every module both adapters have)")
    p.add_argument("--out-dir", type=Path, default=None, metavar="D",
                   help="compare: folder for the heatmaps (default ./rank_compare_A_vs_B)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Dispatches to analyse, compress or compare; returns the exit status."""
    if args.energy is not None:
        R.check_energy(args.energy)
    if args.paths[0] == "compare":
        if len(args.paths) != 3:
            raise ConfigError("usage: lorakit rank compare DIR_A DIR_B")
        return compare(Path(args.paths[1]), Path(args.paths[2]), args)
    if len(args.paths) != 1:
        raise ConfigError("lorakit rank takes one ADAPTER_DIR (or: lorakit rank compare DIR_A DIR_B), "
                          f"got {len(args.paths)} paths")
    directory = Path(args.paths[0])
    if args.compress is not None or args.out is not None:
        return compress(directory, args)
    return analyse(directory, args)


def load(directory: Path):
    """Returns (config, tensors, {module: (A, B)}, {module: scale}) of the adapter in `directory`, in layer order."""
    from lorakit.io import read_adapter  # imported late: the I/O stack is heavy and `--help` should be fast

    config, tensors = read_adapter(directory)  # raises AdapterFileError for a missing or broken folder
    keys = R.lora_keys(tensors)
    if not keys:
        raise AdapterFileError(f"{directory} holds no LoRA factors (no lora_A / lora_B tensors)")
    factors = {m: (tensors[keys[m][0]], tensors[keys[m][1]]) for m in sorted(keys, key=R.natural_key)}
    scales = {m: float(config.scale_for(m)) for m in factors}
    return config, tensors, factors, scales


def analyse(directory: Path, args: argparse.Namespace) -> int:
    """Prints the spectra table (or JSON), writes the plot; returns 0."""
    _, _, factors, scales = load(directory)
    energy = 0.9 if args.energy is None else args.energy
    spectra = {m: R.singular_values(A, B, scales[m]) for m, (A, B) in factors.items()}
    report = {m: {"singular_values": [float(v) for v in s],
                  "effective_rank_90": R.effective_rank(s, 0.9),
                  "effective_rank_99": R.effective_rank(s, 0.99),
                  "stable_rank": R.stable_rank(s)} for m, s in spectra.items()}
    plot = args.plot if args.plot is not None or args.json else directory / "rank_spectra.png"
    if plot is not None:
        plot_spectra(spectra, plot, title=directory.name)
    if args.json:
        print(json.dumps(report))
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LoRA update spectra: {directory}")
    for col in ("module", "r", "scale", "top singular values", "rank@90%", "rank@99%", "stable rank"):
        table.add_column(col, justify="left" if col in ("module", "top singular values") else "right",
                         no_wrap=col == "module", overflow="fold")
    for m, row in report.items():
        s = row["singular_values"]
        top = ", ".join(f"{v:.3g}" for v in s[:TOP_SHOWN]) + (", ..." if len(s) > TOP_SHOWN else "")
        table.add_row(m, str(factors[m][0].shape[0]), f"{scales[m]:.4g}", top, str(row["effective_rank_90"]),
                      str(row["effective_rank_99"]), f"{row['stable_rank']:.2f}")
    console = Console()
    console.print(table)
    pattern = R.rank_pattern(spectra, energy)
    before = sum(_params(A, B, A.shape[0]) for A, B in factors.values())
    after = sum(_params(A, B, pattern[m]) for m, (A, B) in factors.items())
    console.print(f"Recommended rank_pattern for {energy:g} of the energy "
                  f"({after:,} of {before:,} LoRA parameters, {after / before:.1%}):")
    console.print(json.dumps(pattern), soft_wrap=True, markup=False, highlight=False)
    console.print(f"Spectra plot: {plot}", soft_wrap=True, markup=False, highlight=False)
    return 0


def compress(directory: Path, args: argparse.Namespace) -> int:
    """Writes a truncated copy of the adapter with a per-module rank_pattern, prints the errors; returns 0."""
    from lorakit.io import read_metadata, write_adapter

    if args.compress is not None and args.energy is not None:
        raise ConfigError("give either --compress R or --energy E, not both")
    if args.compress is not None and args.compress < 1:
        raise ConfigError(f"--compress must be a rank of at least 1, got {args.compress}")
    config, tensors, factors, scales = load(directory)
    if getattr(config, "use_dora", False):
        # DoRA's magnitude vector was trained against the untruncated direction; truncating silently breaks it
        raise ConfigError(f"{directory} is a DoRA adapter; compressing DoRA adapters is not supported")
    if args.compress is not None:
        ranks = {m: min(args.compress, A.shape[0]) for m, (A, B) in factors.items()}
        out = args.out or directory.with_name(f"{directory.name}-r{args.compress}")
    else:
        energy = 0.9 if args.energy is None else args.energy
        spectra = {m: R.singular_values(A, B, scales[m]) for m, (A, B) in factors.items()}
        ranks = {m: min(r, factors[m][0].shape[0]) for m, r in R.rank_pattern(spectra, energy).items()}
        out = args.out
    if out.resolve() == directory.resolve():
        raise ConfigError(f"--out must differ from the input adapter {directory}; it would be overwritten")

    # Longest names first: PEFT takes the first rank_pattern key that matches as a suffix, so a short module
    # path must not shadow a longer one that ends with it.
    pattern = {m: ranks[m] for m in sorted(ranks, key=lambda m: (-len(m), R.natural_key(m)))}
    new_config = dataclasses.replace(config, rank_pattern=pattern)
    keys = R.lora_keys(tensors)
    new_tensors = dict(tensors)
    errors = {}
    for m, (A, B) in factors.items():
        new_A, new_B, errors[m] = R.truncate(A, B, ranks[m], scales[m], float(new_config.scale_for(m)))
        new_tensors[keys[m][0]], new_tensors[keys[m][1]] = new_A.contiguous(), new_B.contiguous()
    # keep the base model's identity so that loading the compressed adapter still checks the base
    path = write_adapter(out, new_config, new_tensors, read_metadata(directory))

    if args.json:
        print(json.dumps({m: {"r": factors[m][0].shape[0], "new_r": ranks[m], "relative_error": errors[m]}
                          for m in factors}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Compressed {directory} -> {path}")
    for col in ("module", "r", "new r", "relative error"):
        table.add_column(col, justify="left" if col == "module" else "right", no_wrap=col == "module")
    for m in factors:
        table.add_row(m, str(factors[m][0].shape[0]), str(ranks[m]), f"{errors[m]:.3e}")
    console = Console()
    console.print(table)
    console.print(f"Wrote {path} (relative error = ||dW - dW'||_F / ||dW||_F per module)",
                  soft_wrap=True, markup=False, highlight=False)
    return 0


def compare(dir_a: Path, dir_b: Path, args: argparse.Namespace) -> int:
    """Writes a phi heatmap per module and prints phi(m, m) per module (m: smaller 99% effective rank); returns 0."""
    _, _, fa, _ = load(dir_a)
    _, _, fb, _ = load(dir_b)
    common = [m for m in fa if m in fb]
    if args.module:
        for m in args.module:
            if m not in common:
                where = "either adapter" if m not in fa and m not in fb else (dir_b if m in fa else dir_a)
                raise ConfigError(f"module {m!r} is not in {where}.{did_you_mean(m, common)}")
        common = [m for m in common if m in args.module]
    if not common:
        raise AdapterFileError(f"{dir_a} and {dir_b} adapt no module in common; nothing to compare")
    out_dir = args.out_dir or Path(f"rank_compare_{_safe(dir_a.resolve().name)}_vs_{_safe(dir_b.resolve().name)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in common:
        (A1, B1), (A2, B2) = fa[m], fb[m]
        if A1.shape[1:] != A2.shape[1:]:
            raise AdapterFileError(f"module {m!r} has input shape {tuple(A1.shape[1:])} in {dir_a} but "
                                   f"{tuple(A2.shape[1:])} in {dir_b}; were they trained on the same base model?")
        _, S1, Vh1 = R.factor_svd(A1, B1)
        _, S2, Vh2 = R.factor_svd(A2, B2)
        grid = R.subspace_similarity(Vh1.T, Vh2.T)
        # directions past 99% of the energy are noise; comparing them would only measure chance overlap
        top = max(1, min(R.effective_rank(S1, 0.99), R.effective_rank(S2, 0.99)))
        summary = R.similarity_summary(grid, top)
        png = out_dir / f"{_safe(m)}.png"
        plot_similarity(grid, png, title=m, labels=(dir_a.name, dir_b.name), m=top)
        results[m] = {"r_a": grid.shape[0], "r_b": grid.shape[1], "m": top, "phi_1_1": float(grid[0, 0]),
                      "summary": summary, "heatmap": str(png)}
    if args.json:
        print(json.dumps(results))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Subspace similarity phi: {dir_a} vs {dir_b}")
    for col in ("module", "r A", "r B", "m", "phi(1,1)", "phi(m,m)"):
        table.add_column(col, justify="left" if col == "module" else "right", no_wrap=col == "module")
    for m, row in results.items():
        table.add_row(m, str(row["r_a"]), str(row["r_b"]), str(row["m"]), f"{row['phi_1_1']:.3f}",
                      f"{row['summary']:.3f}")
    console = Console()
    console.print(table)
    console.print("phi(m,m): share of the top-m input directions (right singular vectors) of one update that lie "
                  "in the other's top-m; 1 = same subspace, 0 = orthogonal, about m/k by chance. m = the smaller "
                  "of the two effective ranks at 99% energy.", soft_wrap=True, markup=False,
                  highlight=False)
    only = sorted(set(fa) ^ set(fb), key=R.natural_key)
    if only and not args.module:
        console.print(f"Skipped {len(only)} module(s) adapted in only one of the two.", markup=False)
    console.print(f"Heatmaps in {out_dir}", soft_wrap=True, markup=False, highlight=False)
    return 0


def plot_spectra(spectra: dict, path: Path, title: str = "") -> Path:
    """Returns `path` after writing a PNG of normalized singular values and cumulative energy per module."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    n = max(len(spectra) - 1, 1)
    for idx, (m, s) in enumerate(spectra.items()):
        s = s.double()
        color = cmap(idx / n)  # color follows layer order
        x = range(1, s.numel() + 1)
        if float(s[0]) > 0:
            ax_s.semilogy(x, (s / s[0]).clamp_min(1e-12).tolist(), color=color, lw=1, alpha=0.8)
            e = (s ** 2).cumsum(0)
            ax_e.plot(x, (e / e[-1]).tolist(), color=color, lw=1, alpha=0.8)
    ax_s.set(xlabel="index i", ylabel="s_i / s_1", title="singular values (normalized)")
    ax_e.set(xlabel="rank", ylabel="cumulative energy", title="energy kept by the top-i directions", ylim=(0, 1.02))
    for level in (0.9, 0.99):
        ax_e.axhline(level, color="gray", ls="--", lw=0.8)
    fig.suptitle(f"{title}: {len(spectra)} modules (color: layer order, dark = first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_similarity(grid, path: Path, title: str = "", labels: tuple[str, str] = ("A", "B"),
                    m: int | None = None) -> Path:
    """Returns `path` after writing the phi grid as a heatmap PNG (rows: i for A, columns: j for B)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                   extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    fig.colorbar(im, ax=ax, label="phi(i, j)")
    if m is not None and m < min(grid.shape):  # outline the block the summary number reads
        from matplotlib.patches import Rectangle
        ax.add_patch(Rectangle((0.5, 0.5), m, m, fill=False, edgecolor="white", linestyle="--"))
    ax.set(xlabel=f"j (top directions of {labels[1]})", ylabel=f"i (top directions of {labels[0]})",
           title=f"{title}\nphi(m,m) = {R.similarity_summary(grid, m):.3f}, m = {m or min(grid.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _params(A, B, rank: int) -> int:
    """Returns the parameter count of a module's factors at `rank`."""
    return rank * (A[0].numel() + B.shape[0])


def _safe(name: str) -> str:
    """Returns `name` with characters unsafe in file names replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"
