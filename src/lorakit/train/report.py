"""What a run leaves behind for people: metrics.jsonl, a loss/accuracy plot, a README, a before/after table.

    metrics.jsonl   one JSON object a line: {"step", "loss", "lr", "tokens_per_s", ...} while training,
                    {"step", "eval_loss"} at evals, {"step", "accuracy", "per_task"} before and after
    plot.png        train loss + eval loss (left), held-out accuracy (right), against the step
    README.md       the command, the model, the data, the numbers, and how to use the adapter
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends JSON lines to out/metrics.jsonl (a no-op on ranks other than 0)."""

    def __init__(self, out: str | Path, enabled: bool = True) -> None:
        self.path = Path(out) / METRICS
        self.enabled = enabled

    def write(self, record: dict) -> None:
        """Appends one record."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops records of steps after `step` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")


def read_metrics(out: str | Path) -> list[dict]:
    """Returns the records in out/metrics.jsonl (skipping a torn last line)."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(out: str | Path, records: Iterable[dict] | None = None) -> Path:
    """Draws train/eval loss and accuracy against the step into out/plot.png; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(read_metrics(out) if records is None else records)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    acc = [(r["step"], r["accuracy"]) for r in records if "accuracy" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax1.plot(*zip(*evals), "o-", label="eval loss")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss per target token"), ax1.set_title("loss")
    ax1.legend() if (train or evals) else None
    if acc:
        ax2.plot([s for s, _ in acc], [100 * a for _, a in acc], "o-", color="C2", label="held-out accuracy")
        for s, a in acc:
            ax2.annotate(f"{100 * a:.1f}%", (s, 100 * a), textcoords="offset points", xytext=(0, 6), ha="center")
        tasks = sorted({t for r in records if "per_task" in r for t in r["per_task"]})
        for i, task in enumerate(tasks if len(tasks) > 1 else []):
            pts = [(r["step"], 100 * r["per_task"][task]["accuracy"]) for r in records
                   if "per_task" in r and task in r["per_task"]]
            ax2.plot(*zip(*pts), "--", marker=".", lw=1, color=f"C{3 + i}", label=task)
        ax2.set_ylim(0, 105)
        ax2.legend(fontsize=8)
    ax2.set_xlabel("step"), ax2.set_ylabel("exact match (%)"), ax2.set_title("held-out accuracy")
    fig.tight_layout()
    path = Path(out) / "plot.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_rows(before: dict | None, after: dict | None) -> list[tuple[str, int, float | None, float | None]]:
    """Returns (task, n, before, after) rows, per task then 'overall', from two evaluate_accuracy results."""
    ref = after or before or {"per_task": {}}
    rows = []
    for task, v in ref["per_task"].items():
        b = before["per_task"].get(task, {}).get("accuracy") if before else None
        a = after["per_task"].get(task, {}).get("accuracy") if after else None
        rows.append((task, v["n"], b, a))
    rows.append(("overall", ref.get("n", 0), before["accuracy"] if before else None,
                 after["accuracy"] if after else None))
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _delta(b: float | None, a: float | None) -> str:
    return "-" if b is None or a is None else f"{100 * (a - b):+.1f}"


def accuracy_table_markdown(before: dict | None, after: dict | None) -> str:
    """Returns the before/after accuracy table as Markdown."""
    lines = ["| task | n | before | after | change (points) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {t} | {n} | {_pct(b)} | {_pct(a)} | {_delta(b, a)} |" for t, n, b, a in accuracy_rows(before, after)]
    return "\n".join(lines)


def accuracy_table_rich(before: dict | None, after: dict | None, title: str = "held-out accuracy (exact match)"):
    """Returns the before/after accuracy table as a rich Table."""
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("task", "left"), ("n", "right"), ("before", "right"), ("after", "right"),
                         ("change (points)", "right")):
        table.add_column(col, justify=justify)
    for t, n, b, a in accuracy_rows(before, after):
        table.add_row(t, str(n), _pct(b), _pct(a), _delta(b, a), style="bold" if t == "overall" else None)
    return table


def write_readme(out: str | Path, results: dict) -> Path:
    """Writes out/README.md describing the run from `results` (recipe.train's return value); returns its path."""
    o = results["options"]
    lines = [
        f"# lorakit run: {Path(out).name}",
        "",
        f"Command: `{results.get('command', 'lorakit train')}`",
        "",
        f"- base model: `{results.get('model_name', o['model'])}` ({results.get('model_parameters', 0):,} parameters)",
        f"- LoRA: r={o['r']}, alpha={o['lora_alpha']}, dropout={o['lora_dropout']}, "
        f"targets={o['target_modules']}; {results.get('trainable_parameters', 0):,} trainable parameters",
        f"- data: {results.get('data_name', o['data'] or 'embedded default')} — {results.get('train_examples', 0)} "
        f"training examples ({results.get('truncated', 0)} truncated to {o['max_seq_len']} tokens, "
        f"{results.get('skipped_rows', 0)} bad rows skipped), {results.get('eval_rows', 0)} held-out rows",
        f"- steps: {results.get('steps', 0)} of batch {o['batch_size']} x accumulation {o['grad_accum']} "
        f"x {results.get('world_size', 1)} process(es); lr {o['lr']} (warmup {o['warmup_steps']}, cosine), "
        f"LoRA+ ratio {o['lora_plus_ratio']}, seed {o['seed']}",
        f"- time: {results.get('train_seconds', 0):.0f} s training, {results.get('total_seconds', 0):.0f} s in all "
        f"(model load and evaluations included)",
        f"- final train loss {results.get('final_loss', float('nan')):.4f}, "
        f"held-out loss {results.get('eval_loss', float('nan')):.4f}",
    ]
    if results.get("stopped"):
        lines.append(f"- stopped early: {results['stopped']}")
    if results.get("accuracy_after") or results.get("accuracy_before"):
        lines += ["", "## Held-out accuracy (exact match of the generated answer)", "",
                  accuracy_table_markdown(results.get("accuracy_before"), results.get("accuracy_after"))]
    lines += ["", "## Files", "",
              "- `adapter/`: the LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors)",
              "- `metrics.jsonl`, `plot.png`: training and evaluation curves",
              "- `config.yaml`: every option of this run (`lorakit train --config config.yaml` reruns it)",
              "- `checkpoints/`: resumable checkpoints (`lorakit train --out <this folder> --resume`)",
              "", "## Use it", "",
              f"    lorakit generate --model {o['model']} --adapter {Path(out) / 'adapter'} \"your prompt\"",
              f"    lorakit eval --model {o['model']} --adapter {Path(out) / 'adapter'} --data held_out.jsonl", ""]
    path = Path(out) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
