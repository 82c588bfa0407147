"""Experiment trackers: `--report-to tensorboard,mlflow,trackio,wandb` (HF Trainer's names), all local/offline.

Each tracker gets every metrics.jsonl record (numbers only; nested ones such as per_task flattened with '/',
the before/after accuracy prefixed with its phase) at its step, and the run's options as its config:

    tensorboard  <run>/tensorboard/ event files (torch.utils.tensorboard); config as text    extra: tensorboard
    mlflow       $MLFLOW_TRACKING_URI, else sqlite:///<run>/mlflow.db (experiment 'lorakit',
                 run named after the run folder); options as params, config.yaml as artifact extra: mlflow
    trackio      trackio's local SQLite store ($TRACKIO_DIR, else <run>/trackio when trackio
                 was not imported yet), project 'lorakit'                                      extra: trackio
    wandb        offline run under <run>/wandb/ ($WANDB_MODE honoured; `wandb sync` uploads)   extra: wandb

A resumed run (--resume) goes on in the same tracker run where the tracker can (MLflow: the run of that
name, trackio: resume="allow", wandb: the run id kept in <run>/wandb/lorakit-run-id); TensorBoard appends.
`all` = every installed one; `none` = no tracker. A tracker that is asked for but not installed raises
ConfigError naming its pip extra, before any model or data is loaded.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import time
from pathlib import Path

from lorakit.errors import ConfigError

# name -> (module that must be importable, pip extra)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "trackio": ("trackio", "trackio"), "wandb": ("wandb", "wandb")}
PROJECT = "lorakit"


def check_report_to(names) -> list[str]:
    """Returns the names as a list; ValueError for a name that is not a tracker, 'all' or 'none'."""
    names = [names] if isinstance(names, str) else list(names or [])
    names = [n.strip().lower() for part in names for n in str(part).split(",") if n.strip()]
    for n in names:
        if n not in TRACKERS and n not in ("all", "none"):
            raise ValueError(f"unknown tracker {n!r}; choose from {', '.join(TRACKERS)}, all or none")
    return names


def resolve_report_to(names) -> list[str]:
    """Returns the trackers to open: 'all' = the installed ones; ConfigError naming the extra of a missing one."""
    names = check_report_to(names)
    if "all" in names:
        return [n for n, (mod, _) in TRACKERS.items() if importlib.util.find_spec(mod) is not None]
    out = []
    for n in names:
        if n == "none" or n in out:
            continue
        mod, extra = TRACKERS[n]
        if importlib.util.find_spec(mod) is None:
            raise ConfigError(f"--report-to {n}: the '{mod}' package is not installed; "
                              f"pip install 'lorakit[{extra}]'")
        out.append(n)
    return out


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """Returns (step, {name: number}) for a metrics.jsonl record, nested dicts flattened with '/'."""
    step = int(record.get("step", 0))
    prefix = f"{record['phase']}/" if record.get("phase") else ""
    out: dict[str, float] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + key] = float(value)

    for key, value in record.items():
        if key not in ("step", "phase"):
            walk(key, value)
    return step, out


class _TensorBoard:
    def __init__(self, out: Path, run_name: str, config: dict, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.where = out / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.where))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, run_name: str, config: dict, resume: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.where = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.where)
        exp = self.client.get_experiment_by_name(PROJECT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            PROJECT, artifact_location=(out / "mlruns").resolve().as_uri())
        earlier = self.client.search_runs([exp_id], f"attributes.run_name = '{run_name}'") if resume else []
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return  # its params were logged by the first run (MLflow params cannot change)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        params = [Param(k, json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000])
                  for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        if (out / "config.yaml").is_file():
            self.client.log_artifact(self.run_id, str(out / "config.yaml"))

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Trackio:
    def __init__(self, out: Path, run_name: str, config: dict, resume: bool) -> None:
        import sys
        if "trackio" not in sys.modules:  # its store is fixed at import: put it in the run folder
            os.environ.setdefault("TRACKIO_DIR", str((out / "trackio").resolve()))
        import trackio
        self.trackio = trackio
        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints dashboard hints to stdout
            self.run = trackio.init(project=PROJECT, name=run_name, config=config, embed=False,
                                    resume="allow" if resume else "never", auto_log_gpu=False, auto_log_cpu=False)
        from trackio.utils import TRACKIO_DIR
        self.where = str(TRACKIO_DIR)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()  # the module-level finish also clears trackio's current run (no atexit finish)


class _WandB:
    def __init__(self, out: Path, run_name: str, config: dict, resume: bool) -> None:
        import wandb
        mode = os.environ.get("WANDB_MODE", "offline")
        id_file = out / "wandb" / "lorakit-run-id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(project=PROJECT, name=run_name, dir=str(out), config=config, mode=mode, id=run_id,
                              resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id + "\n")
        self.where = str(out / "wandb")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "trackio": _Trackio, "wandb": _WandB}


class Trackers:
    """The open trackers of one run: log(record) sends a metrics.jsonl record to each, close() ends them."""

    def __init__(self, names, out: str | os.PathLike, config: dict, run_name: str | None = None,
                 resume: bool = False) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.names = resolve_report_to(names)
        self.open = {n: _CLASSES[n](out, run_name or out.name, config, resume) for n in self.names}

    def where(self) -> dict[str, str]:
        """Returns {tracker: where its data is}."""
        return {n: str(t.where) for n, t in self.open.items()}

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        if values:
            for t in self.open.values():
                t.log(step, values)

    def close(self) -> None:
        for t in self.open.values():
            t.close()
        self.open = {}


class TrackedMetrics:
    """A MetricsLog whose every record also goes to the trackers (same records, same steps)."""

    def __init__(self, metrics, trackers: Trackers | None) -> None:
        self.metrics, self.trackers = metrics, trackers

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def __getattr__(self, name):
        return getattr(self.metrics, name)
