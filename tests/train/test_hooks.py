"""Recipe hooks: a hook stops a run, on_step_end sees the logged losses, step_fn/optimizer_fn replace pieces."""
from __future__ import annotations

import pytest

from lorakit.train import recipe
from lorakit.train.hooks import Hooks
from lorakit.train.options import TrainOptions
from lorakit.train.report import read_metrics
from lorakit.train.step import train_step
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hooks")
    return {"model": str(write_tiny_model(d / "model")), "train": str(write_jsonl(d / "train.jsonl", alpaca_rows(16))),
            "eval": str(write_jsonl(d / "eval.jsonl", alpaca_rows(4)))}


def options(files, out, **kw) -> TrainOptions:
    base = dict(model=files["model"], data=files["train"], eval_data=files["eval"], out=str(out), max_steps=6,
                batch_size=4, lr=1e-2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], save_every=0,
                eval_every=2, warmup_steps=1, accuracy=False, progress=False)
    return TrainOptions(**{**base, **kw})


class Recorder(Hooks):
    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.losses, self.evals, self.calls = stop_at, {}, {}, []

    def on_train_start(self, run) -> None:
        self.calls.append("start")

    def on_step_end(self, run, result) -> None:
        self.losses[run.step] = result.loss

    def on_eval(self, run, eval_loss: float) -> None:
        self.evals[run.step] = eval_loss

    def should_stop(self, run) -> bool:
        return self.stop_at is not None and run.step >= self.stop_at

    def on_train_end(self, run) -> None:
        self.calls.append("end")


def test_on_step_end_and_on_eval_see_what_metrics_jsonl_records(files, tmp_path):
    hook = Recorder()
    res = recipe.train(options(files, tmp_path / "out"), hooks=[hook])
    records = read_metrics(tmp_path / "out")
    assert hook.losses == {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(hook.losses) == list(range(1, 7))
    assert hook.evals == {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(hook.evals) == [2, 4, 6] and hook.evals[6] == res["eval_loss"]
    assert hook.calls == ["start", "end"]


def test_a_hook_stops_the_run_at_step_k(files, tmp_path):
    hook = Recorder(stop_at=3)
    res = recipe.train(options(files, tmp_path / "out"), hooks=[hook])
    assert res["exit_code"] == 0 and res["steps_done"] == 3 and res["stopped_early"] == 3
    assert sorted(hook.losses) == [1, 2, 3]
    assert max(r["step"] for r in read_metrics(tmp_path / "out")) == 3
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()  # finished normally


def test_step_fn_and_optimizer_fn_replace_the_step_and_the_optimizer(files, tmp_path):
    import torch
    seen = {"steps": 0}

    def counting_step(*a, **k):
        seen["steps"] += 1
        return train_step(*a, **k)

    def sgd(model, lr, *rest):
        seen["optimizer"] = True
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    res = recipe.train(options(files, tmp_path / "out", max_steps=2), step_fn=counting_step, optimizer_fn=sgd,
                       write_files=False)
    assert seen == {"steps": 2, "optimizer": True} and res["steps_done"] == 2
    assert not (tmp_path / "out").exists()  # write_files=False leaves nothing behind
