"""Issue 21 run outputs: --report-to trackers read back with their own readers, plain progress lines in logs,
--adapter taking run/checkpoint/adapter folders, and the data checked before the model loads."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lorakit.io.adapter_paths import resolve_adapter_dir, run_dir_of
from lorakit.cli import main
from lorakit.errors import AdapterFileError
from lorakit.train.report import read_metrics
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    return {"model": str(write_tiny_model(d / "model")), "train": str(write_jsonl(d / "train.jsonl", alpaca_rows(16))),
            "dir": d}


def train_args(files, out, *extra):
    return ["train", "--model", files["model"], "--data", files["train"], "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--r", "4", "--target-modules", "q_proj,v_proj", "--no-accuracy",
            "--save-every", "2", "--keep-checkpoints", "0", "warmup_steps=1", *extra]


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- trackers


def wandb_records(path: Path):
    """Yields wandb's protobuf Records from an offline .wandb file (its LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header crc32/length/type), parsed with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    pos, block, buf = 7, 32768, b""  # file header: ':W&B' + magic + version
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # the block's tail is padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def wandb_logs(folder: Path, timeout: float = 60.0) -> list[Path]:
    """Returns the offline .wandb files under `folder` once each holds its run's exit record: wandb's service
    process finishes writing them after Run.finish() returns."""
    import time
    deadline = time.time() + timeout
    while True:
        logs = sorted(Path(folder).glob("offline-run-*/run-*.wandb"))
        done = [any(r.HasField("exit") for r in wandb_records(p)) for p in logs]
        if (logs and all(done)) or time.time() > deadline:
            return logs
        time.sleep(0.2)


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "trackio", "wandb"])
def test_each_tracker_writes_a_readable_run(files, tmp_path, capsys, monkeypatch, tracker):
    pytest.importorskip(tracker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / f"run-{tracker}"
    rc, _, err = cli(capsys, *train_args(files, out, "--report-to", tracker, "--no-progress"))
    assert rc == 0, err
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    where = json.loads((out / "results.json").read_text())["trackers"][tracker]
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(where)
        acc.Reload()
        got = {e.step: e.value for e in acc.Scalars("loss")}
        assert "config" in str(acc.Tags())
    elif tracker == "mlflow":
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=where)
        [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        assert run.info.run_name == out.name and run.data.params["r"] == "4" and run.info.status == "FINISHED"
    elif tracker == "trackio":
        from trackio.sqlite_storage import SQLiteStorage
        got = {r["step"]: r["loss"] for r in SQLiteStorage.get_logs("lorakit", out.name) if "loss" in r}
        assert SQLiteStorage.get_run_config("lorakit", out.name)["r"] == 4
    else:
        [log] = wandb_logs(Path(where))
        got, config = {}, {}
        for rec in wandb_records(log):
            if rec.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                if "loss" in items:
                    got[items["_step"]] = items["loss"]
            if rec.HasField("run"):
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        assert config["r"] == {"value": 4} or config["r"] == 4
    assert got == pytest.approx(losses)


def test_report_to_errors(files, tmp_path, capsys, monkeypatch):
    rc, _, err = cli(capsys, *train_args(files, tmp_path / "a", "--report-to", "tensorbored"))
    assert rc == 2 and "unknown tracker 'tensorbored'" in err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    rc, _, err = cli(capsys, *train_args(files, tmp_path / "b", "--report-to", "wandb"))
    assert rc == 2 and "pip install 'lorakit[wandb]'" in err and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- progress in logs


def test_plain_progress_lines_when_stdout_is_not_a_terminal(files, tmp_path, capsys):
    rc, out, err = cli(capsys, *train_args(files, tmp_path / "run", "--progress-every", "2"))
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "4/4"]
    assert all(k in lines[1] for k in ("loss ", "lr ", "tok/s", "eta ")), lines


def test_quiet_third_party_progress(monkeypatch):
    from transformers.utils import logging as hf_logging

    from lorakit.train.progress import default_every, quiet_third_party_progress
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "0")
    try:
        assert quiet_third_party_progress(force=True)
        assert not hf_logging.is_progress_bar_enabled()
        import os
        assert os.environ["TQDM_DISABLE"] == "1"
    finally:
        hf_logging.enable_progress_bar()
    assert (default_every(60), default_every(7), default_every(1000)) == (3, 1, 50)


# ---------------------------------------------------------------- --adapter: run, checkpoint or adapter folder


def test_adapter_paths_accept_run_checkpoint_and_adapter_folders(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(files, run, "--no-progress")) == 0
    capsys.readouterr()
    step2 = run / "checkpoints" / "step-000002"
    assert resolve_adapter_dir(run) == run / "adapter"
    assert resolve_adapter_dir(run / "adapter") == run / "adapter"
    assert resolve_adapter_dir(step2) == step2 / "adapter"
    assert run_dir_of(step2 / "adapter") == run and run_dir_of(run / "adapter") == run
    # a stopped run (no final adapter): the newest complete checkpoint; an incomplete one is passed over
    import shutil
    shutil.rmtree(run / "adapter")
    (run / "checkpoints" / "step-000004" / "complete").unlink()
    assert resolve_adapter_dir(run) == step2 / "adapter"
    with pytest.raises(AdapterFileError, match="Looked for .*adapter_config.json.*checkpoints/step-"):
        resolve_adapter_dir(tmp_path)
    # every command that takes an adapter takes the run folder
    rc, out, err = cli(capsys, "inspect", str(run), "--json")
    assert rc == 0 and json.loads(out)["directory"] == str(step2 / "adapter")
    rc, out, err = cli(capsys, "eval", "--adapter", str(run), "--data", files["train"], "--limit", "2",
                       "--max-new-tokens", "1", "--json")
    assert rc == 0, err
    csv = tmp_path / "held.csv"  # eval reads CSV through datasets, with --columns
    csv.write_text("q,a\n" + "".join(f"{r['instruction']} {r['input']},{r['output']}\n" for r in alpaca_rows(3)))
    rc, out, err = cli(capsys, "eval", "--adapter", str(run / "checkpoints" / "step-000002"), "--data", str(csv),
                       "--columns", "instruction=q,output=a", "--max-new-tokens", "1", "--json")
    assert rc == 0 and json.loads(out)["n"] == 3, err
    rc, out, err = cli(capsys, "rank", str(run), "--json")
    assert rc == 0, err
    rc, _, err = cli(capsys, "merge", "--base", files["model"], "--adapter", str(run), "--out", str(tmp_path / "m"))
    assert rc == 0 and (tmp_path / "m" / "config.json").is_file(), err


# ---------------------------------------------------------------- data before the model


def test_bad_data_fails_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    import lorakit.loading.pretrained
    import lorakit.models
    folder = Path(files["model"])
    bare = tmp_path / "no-weights"  # config + tokenizer, no weights: loading it would fail (or take minutes)
    bare.mkdir()
    for f in folder.iterdir():
        if not f.name.endswith(".safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    loads = []
    for module in (lorakit.models, lorakit.loading.pretrained):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    bad = write_jsonl(tmp_path / "bad.jsonl", alpaca_rows(3) + [{"instruction": "x", "output": 5}])
    rc, out, err = cli(capsys, "train", "--model", str(bare), "--data", str(bad), "--out", str(tmp_path / "r"))
    assert rc == 2 and f"{bad}, line 4, field 'output'" in err and loads == []
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("tracker", ["mlflow", "trackio", "wandb"])
def test_a_resumed_run_goes_on_in_the_same_tracker_run(tmp_path, monkeypatch, tracker):
    pytest.importorskip(tracker)
    from lorakit.train.trackers import Trackers
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "resumed"
    for steps, resume in (((1, 2), False), ((3, 4), True)):
        t = Trackers([tracker], out, {"r": 4}, resume=resume)
        for s in steps:
            t.log({"step": s, "loss": 1.0 / s})
        where = t.where()[tracker]
        t.close()
    if tracker == "mlflow":
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=where)
        runs = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
        assert len(runs) == 1
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    elif tracker == "trackio":
        from trackio.sqlite_storage import SQLiteStorage
        steps = [r["step"] for r in SQLiteStorage.get_logs("lorakit", "resumed")]
    else:
        logs = wandb_logs(Path(where))
        ids = {p.stem for p in logs}
        assert len(ids) == 1, ids  # one run id, written by both processes
        steps = []
        for log in logs:
            steps += [json.loads(i.value_json) for rec in wandb_records(log) if rec.HasField("history")
                      for i in rec.history.item if (i.key or "/".join(i.nested_key)) == "_step"]
    assert sorted(steps) == [1, 2, 3, 4]
