"""Adaptive rank (AdaLoRA-style): budget schedule, importance masking, orthogonality, and the finalized adapter
loading in real `peft` with the same logits."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.train.adaptive import TripletFactor, budget_mask, budget_schedule, enable_adaptive_rank, orthogonality
from lorakit.errors import ConfigError
from tests.conftest import model_inputs, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 6 modules on the 2-layer tiny llama


def adaptive_model(r=6, alpha=12, **kw):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    ctrl = enable_adaptive_rank(model, **{"target_r": 2, "total_steps": 30, "warmup": 4, "final": 6,
                                          "orth_reg": 0.5, "seed": 0, **kw})
    return model, ctrl


def train(model, ctrl, steps, lr=2e-2, seed=0):
    """A plain loop on random tokens; returns the orthogonality penalties seen at each step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    penalties = []
    for t in range(steps):
        ids = torch.randint(3, 101, (4, 12), generator=g)
        penalty = ctrl.penalty(model)
        loss = model(input_ids=ids, labels=ids).loss + penalty
        loss.backward()
        opt.step()
        ctrl.step(model, t)
        opt.zero_grad(set_to_none=True)
        penalties.append(float(penalty.detach()) / ctrl.orth_reg)
    model.eval()
    return penalties


@pytest.fixture(scope="module")
def trained():
    model, ctrl = adaptive_model(target_r=3)  # on random tokens this ends uneven, e.g. [4, 6, 0, 2, 6, 0]
    penalties = train(model, ctrl, 30)
    return model, ctrl, penalties


# ---------------------------------------------------------------------------- pure pieces
def test_budget_schedule_is_cubic_from_init_to_target():
    sched = [budget_schedule(t, 60, 12, 100, 10, 20) for t in range(100)]
    assert all(b == 60 and not f for b, f in sched[:11])
    assert all(b == 12 and f for b, f in sched[80:])
    mid = [b for b, _ in sched[11:80]]
    assert mid == sorted(mid, reverse=True) and 12 <= min(mid) and max(mid) < 60
    assert sched[45][0] == int(12 + 48 * (1 - 35 / 70) ** 3)  # halfway: 1/8 of the excess is left


def test_budget_mask_keeps_exactly_the_top_scores_across_modules():
    scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.3, 0.8]), "c": torch.tensor([0.05])}
    mask = budget_mask(scores, 3)
    assert mask["a"].tolist() == [True, False, True]
    assert mask["b"].tolist() == [False, True]
    assert mask["c"].tolist() == [False]
    assert sum(int(m.sum()) for m in budget_mask(scores, 6).values()) == 6


def test_orthogonality_is_zero_for_orthonormal_factors():
    P = torch.linalg.qr(torch.randn(10, 3))[0]
    Q = torch.linalg.qr(torch.randn(7, 3))[0].T
    assert float(orthogonality(P, Q)) < 1e-10
    assert float(orthogonality(2 * P, Q)) == pytest.approx(3 * 9, rel=1e-5)  # ||4I - I||^2 = 9 per column


# ---------------------------------------------------------------------------- the parametrization
def test_enable_keeps_output_and_hot_path_sees_diag_lambda_q():
    model, ctrl = adaptive_model()
    base = tiny_llama()
    x = model_inputs("llama")
    assert torch.equal(model(**x).logits, base(**x).logits)  # λ = 0 at the start
    layer = model.model.layers[0].self_attn.q_proj
    A = layer.lora_A["default"]
    assert isinstance(A, TripletFactor) and A.Q.shape == (6, 32)
    with torch.no_grad():
        A.E.normal_()
    expected = A.E[:, None] * A.Q
    got, B = layer.factors("default")
    assert torch.equal(got, expected) and B is layer.lora_B["default"].weight
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.lora_A.default.E" in names


def test_mask_to_budget_zeroes_lambda_of_the_lowest_scores():
    model, ctrl = adaptive_model()
    names = list(ctrl.layers)
    with torch.no_grad():
        for i, n in enumerate(names):
            ctrl.layers[n].lora_A["default"].E.fill_(1.0)
            # score of triplet j in module i = (i * 6 + j) (all via λ; P and Q score 0)
            d = ctrl.layers[n].out_features
            ctrl.ipt[n] = {"E": torch.arange(6.0) + 6 * i, "Q": torch.zeros(6, 32), "P": torch.zeros(d, 6)}
            ctrl.unc[n] = {k: torch.ones_like(v) for k, v in ctrl.ipt[n].items()}
    ctrl.mask_to_budget(8)  # the 8 best are the last 6 of module 5 and the last 2 of module 4
    ranks = ctrl.ranks()
    assert [ranks[n] for n in names] == [0, 0, 0, 0, 2, 6]
    E4 = ctrl.layers[names[4]].lora_A["default"].E
    assert E4.tolist() == [0, 0, 0, 0, 1, 1]


def test_bad_settings_are_refused():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="target_r"):
        enable_adaptive_rank(model, target_r=5, total_steps=10)
    with pytest.raises(ConfigError, match="warmup"):
        enable_adaptive_rank(model, target_r=2, total_steps=10, warmup=8, final=5)
    with pytest.raises(ConfigError, match="no adapter"):
        enable_adaptive_rank(model, target_r=2, adapter_name="other")


# ---------------------------------------------------------------------------- training end to end
def test_training_ends_exactly_at_the_budget(trained):
    model, ctrl, _ = trained
    assert ctrl.frozen and ctrl.budget == 3 * 6
    assert sum(ctrl.ranks().values()) == 18
    for n, layer in ctrl.layers.items():
        E = layer.lora_A["default"].E
        assert int((E != 0).sum()) <= ctrl.ranks()[n]  # pruned λ stay at zero after the last step


def test_orthogonality_penalty_decreases(trained):
    _, _, penalties = trained
    assert penalties[-1] < 0.5 * penalties[0]


def test_mask_follows_the_scores(trained):
    _, ctrl, _ = trained
    # the frozen mask is the global top-12 of the scores at the step the final phase began
    kept = torch.cat([s[ctrl.mask[n]] for n, s in ctrl.last_scores.items()])
    dropped = torch.cat([s[~ctrl.mask[n]] for n, s in ctrl.last_scores.items()])
    assert kept.numel() == 18 and float(kept.min()) >= float(dropped.max())


def test_finalized_adapter_loads_in_peft_with_the_same_logits(trained, tmp_path):
    model, ctrl, _ = trained
    x = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        before = model(**x).logits
    ranks = ctrl.finalize(model, "default")
    assert sum(ranks.values()) == 18
    with torch.no_grad():
        after = model(**x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # finalize changes nothing but the shape
    for n, r in ranks.items():
        layer = model.get_submodule(n)
        assert layer.lora_A["default"].weight.shape[0] == r == layer.r["default"]
    path = lorakit.save_adapter(model, tmp_path / "ada")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ranks and len(set(ranks.values())) > 1  # ranks really differ per module

    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    with torch.no_grad():
        theirs = peft_model(**x).logits
    assert float((theirs - after).abs().max()) <= 1e-5
    ours = lorakit.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        assert float((ours(**x).logits - after).abs().max()) <= 1e-5


def test_rank_zero_modules_are_dropped_and_excluded(tmp_path):
    model, ctrl = adaptive_model()
    train(model, ctrl, 3)
    names = list(ctrl.layers)
    with torch.no_grad():  # module 0 scores 0; elsewhere triplet j scores j + 0.01 * module index
        for i, n in enumerate(names):
            for k in ctrl.ipt[n]:
                ctrl.ipt[n][k].zero_()
                ctrl.unc[n][k].fill_(1.0)
            if i:
                ctrl.ipt[n]["E"].copy_(torch.arange(6.0) + 0.01 * i)
    ranks = ctrl.finalize(model)
    assert ranks == {names[1]: 2, names[2]: 2, names[3]: 2, names[4]: 3, names[5]: 3}
    x = model_inputs("llama")
    with torch.no_grad():
        after = model(**x).logits
    path = lorakit.save_adapter(model, tmp_path / "ada")
    assert json.loads((path / "adapter_config.json").read_text())["exclude_modules"] == [names[0]]
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    with torch.no_grad():
        assert float((peft_model(**x).logits - after).abs().max()) <= 1e-5
