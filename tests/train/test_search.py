"""lorakit search: median pruning, resuming from SQLite, retrying interrupted trials, and the CLI end to end on a
tiny model (3 real trials, the third one in a second invocation)."""
from __future__ import annotations

import json

import optuna
import pytest
import yaml

from lorakit.cli import main
from lorakit.search import SearchSpace, parse_target_sets, run_search, write_outputs
from lorakit.train.options import TrainOptions, load_options
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model

SPACE = SearchSpace(ranks=[2, 4], alpha_ratios=[1.0, 2.0], lr_min=1e-3, lr_max=1e-2, dropouts=[0.0, 0.1],
                    target_sets={"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]})


def fake_runner(values, calls):
    """A runner whose n-th call reports values[n] at steps 1..3 and returns it; records the options it got."""
    def run(options, ctx, report):
        value = values[len(calls)]
        calls.append(options)
        for step in (1, 2, 3):
            report(step, value)
        return value
    return run


def states(study):
    return [t.state.name for t in study.trials]


def test_median_pruner_stops_trials_worse_than_the_median(tmp_path):
    calls = []
    study = run_search(TrainOptions(), SPACE, tmp_path, 3, metric="loss", pruner_startup=1,
                       runner=fake_runner([1.0, 10.0, 0.5], calls), log=lambda *a: None)
    assert states(study) == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert study.best_trial.number == 2 and study.trials[1].user_attrs["last_step"] == 1
    o = calls[0]
    assert o.r in (2, 4) and o.lora_alpha in (o.r, 2 * o.r) and 1e-3 <= o.lr <= 1e-2
    assert o.target_modules in (SPACE.target_sets["qv"], SPACE.target_sets["attention"])


def test_resume_continues_the_trial_count_and_retries_an_interrupted_trial(tmp_path):
    quiet = dict(metric="loss", log=lambda *a: None)
    calls = []
    run_search(TrainOptions(), SPACE, tmp_path, 2, runner=fake_runner([3.0, 2.0], calls), **quiet)

    def interrupted(options, ctx, report):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_search(TrainOptions(), SPACE, tmp_path, 4, runner=interrupted, **quiet)
    study = run_search(TrainOptions(), SPACE, tmp_path, 4, runner=fake_runner([1.0, 1.5], []), **quiet)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert states(study) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[3].user_attrs["retry_of"] == 2 and study.trials[3].params == study.trials[2].params
    again = run_search(TrainOptions(), SPACE, tmp_path, 4, runner=fake_runner([], []), **quiet)
    assert len(again.trials) == 5  # already 4 finished: nothing runs


def test_best_yaml_is_a_train_config(tmp_path):
    base = TrainOptions(max_steps=300, batch_size=4)
    study = run_search(base, SPACE, tmp_path, 3, runner=fake_runner([2.0, 1.0, 3.0], []), metric="loss",
                       pruner_startup=5, log=lambda *a: None)
    paths = write_outputs(study, base, SPACE, tmp_path, "loss", log=lambda *a: None)
    best = study.best_trial.params
    o = load_options(paths["best"])
    assert (o.r, o.lora_alpha, o.lr, o.lora_dropout) == (best["r"], best["r"] * best["alpha_ratio"], best["lr"],
                                                          best["lora_dropout"])
    assert o.target_modules == SPACE.target_sets[best["target_modules"]]
    assert o.max_steps == 300 and o.batch_size == 4  # base options kept; trial length is the search's own
    assert paths["history"].stat().st_size > 0 and paths["importances"].stat().st_size > 0


def test_parse_target_sets():
    sets = parse_target_sets(["qv", "mlp=gate_proj+up_proj+down_proj", "all-linear", "o_proj"])
    assert sets == {"qv": ["q_proj", "v_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
                    "all-linear": "all-linear", "o_proj": ["o_proj"]}


def test_cli_three_tiny_trials_then_resume(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", alpaca_rows(8, seed=1))
    out = tmp_path / "search"
    args = ["search", "--model", str(model), "--data", str(train), "--eval-data", str(held), "--out", str(out),
            "--trial-steps", "4", "--eval-every", "2", "--ranks", "2,4", "--lr", "1e-3:1e-2",
            "--target-sets", "qv,attention", "template=alpaca", "batch_size=4",
            "warmup_steps=0", "eval_batch_size=8"]
    assert main(args + ["--trials", "2"]) == 0
    assert main(args + ["--trials", "3"]) == 0
    text = capsys.readouterr().out
    assert "2 trial(s) finished, running 1 more" in text
    study = optuna.load_study(study_name="lorakit-search", storage=f"sqlite:///{out / 'search.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    for name in ("best.yaml", "history.png", "intermediate.png", "trials.json"):
        assert (out / name).stat().st_size > 0
    assert len(json.loads((out / "trials.json").read_text())) == 3
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["r"] == study.best_trial.params["r"] and config["model"] == str(model)
    assert load_options(out / "best.yaml").lr == study.best_trial.params["lr"]


@pytest.mark.parametrize("how", ["nf4", "nf4-gptq"])
def test_search_context_quantizes_the_base_as_the_recipe_does(tmp_path, how):
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import is_quantized_layer
    from lorakit.search import build_context
    model = str(write_tiny_model(tmp_path / "m"))
    data = str(write_jsonl(tmp_path / "t.jsonl", alpaca_rows(12)))
    o = load_options(overrides={"model": model, "data": data, "quantize": how, "quant_calibration": 3})
    logged = []
    ctx = build_context(o, logged.append)
    assert is_quantized_layer(ctx.model.model.layers[0].mlp.down_proj)
    assert any("GPTQ" in str(m) for m in logged) == (how == "nf4-gptq")
