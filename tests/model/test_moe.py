"""LoRA on mixture-of-experts parameters (target_parameters): PEFT parity, adapters, merging, refusals."""
from __future__ import annotations


import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.layers.param import LoraParam
from lorakit.model.state import adapter_configs
from moe_fixtures import EXPERTS, IDS, base, logits, matrix  # noqa: F401

peft = pytest.importorskip("peft")


def peft_adapter(tmp_path, arch="qwen3_moe", name="p", **kw):
    cfg = dict(r=4, lora_alpha=8, target_modules=None, target_parameters=EXPERTS, init_lora_weights=False)
    cfg.update(kw)
    torch.manual_seed(len(name))
    pm = peft.get_peft_model(base(arch), peft.LoraConfig(**cfg))
    pm.save_pretrained(tmp_path / name)
    return pm, tmp_path / name


def trained_grads(directory, arch="qwen3_moe", checkpointing=False) -> dict:
    """Returns the factor gradients of one training step of the adapter in `directory` (loaded by lorakit)."""
    m = lorakit.load_adapter(base(arch), directory, is_trainable=True).train()
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


def assert_same_grads(a: dict, b: dict, **tol) -> None:
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], **tol)


@pytest.fixture(params=[True, False], ids=["grouped", "effective-weight"])
def path(request, monkeypatch):
    monkeypatch.setattr(LoraParam, "use_grouped", request.param)
    return request.param


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "llama4_text", "deepseek_v3"])
def test_peft_target_parameters_load_with_equal_logits(tmp_path, arch, path):
    pm, d = peft_adapter(tmp_path, arch)
    want = logits(pm)
    model = lorakit.load_adapter(base(arch), d)
    assert (logits(model) - want).abs().max() <= 1e-5
    assert (want - logits(base(arch))).abs().max() > 1e-3
    assert sum(isinstance(m, LoraParam) for m in model.modules()) == 2 * model.config.num_hidden_layers - (
        1 if arch == "deepseek_v3" else 0) * 2


def test_grouped_and_effective_weight_paths_agree_on_gradients(tmp_path, monkeypatch):
    _, d = peft_adapter(tmp_path)
    grads = []
    for grouped in (True, False):
        monkeypatch.setattr(LoraParam, "use_grouped", grouped)
        grads.append(trained_grads(d))
    assert_same_grads(*grads, rtol=1e-4, atol=1e-6)


def test_recomputed_effective_weight_gives_the_same_gradients(tmp_path, monkeypatch):
    _, d = peft_adapter(tmp_path)
    monkeypatch.setattr(LoraParam, "use_grouped", False)
    grads = []
    for recompute in (True, False):
        monkeypatch.setattr(LoraParam, "recompute_weight", recompute)
        grads.append(trained_grads(d))
    assert_same_grads(*grads)


def test_rank_and_alpha_pattern_per_parameter_round_trip_with_peft(tmp_path):
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS, init_lora_weights="none",
                             rank_pattern={"gate_up_proj": 6}, alpha_pattern={"down_proj": 3})
    model = lorakit.inject(base(), cfg)
    layer = model.model.layers[0].mlp.experts
    assert layer.parameter_name == "down_proj" and layer.base_layer.parameter_name == "gate_up_proj"
    assert layer.base_layer.r["default"] == 6 and layer.scaling["default"] == 3 / 4
    assert tuple(layer.base_layer.lora_A["default"].weight.shape) == (6 * 4, 32)
    lorakit.save_adapter(model, tmp_path / "lk")
    pm = peft.PeftModel.from_pretrained(base(), tmp_path / "lk")
    assert (logits(pm) - logits(model)).abs().max() <= 1e-5


def test_several_adapters_activate_combine_and_delete(tmp_path):
    pa, da = peft_adapter(tmp_path, name="a")
    pb, db = peft_adapter(tmp_path, name="bb")
    model = lorakit.load_adapter(base(), da, adapter_name="a")
    lorakit.load_adapter(model, db, adapter_name="bb")
    assert (logits(model) - logits(pa)).abs().max() <= 1e-5
    lorakit.set_adapter(model, "bb")
    assert (logits(model) - logits(pb)).abs().max() <= 1e-5
    lorakit.set_adapter(model, ["a", "bb"])
    both = peft.PeftModel.from_pretrained(base(), da, adapter_name="a")
    both.load_adapter(db, adapter_name="bb")
    both.base_model.set_adapter(["a", "bb"])
    assert (logits(model) - logits(both)).abs().max() <= 1e-5
    with lorakit.disable_adapters(model):
        assert (logits(model) - logits(base())).abs().max() <= 1e-6
    lorakit.delete_adapter(model, "a")
    assert (logits(model) - logits(pb)).abs().max() <= 1e-5


def test_merge_unmerge_and_unload_restore_the_base():
    model = lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=EXPERTS, init_lora_weights="none"))
    w0 = base().model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    adapted = logits(model)
    lorakit.merge(model)
    assert (logits(model) - adapted).abs().max() <= 1e-5
    lorakit.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].mlp.experts.owner.gate_up_proj.detach(), w0)
    plain = lorakit.unload(model)
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert (logits(plain) - logits(base())).abs().max() <= 1e-6


def test_mixed_adapter_batches_give_each_row_its_adapter(tmp_path):
    _, da = peft_adapter(tmp_path, name="a")
    _, db = peft_adapter(tmp_path, name="bb")
    model = lorakit.load_adapter(base(), da, adapter_name="a")
    lorakit.load_adapter(model, db, adapter_name="bb")
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["bb", "__base__"]).logits
    lorakit.set_adapter(model, "bb")
    torch.testing.assert_close(mixed[0], logits(model)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits(base())[1], rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batches_are_refused_on_the_effective_weight_path(monkeypatch):
    monkeypatch.setattr(LoraParam, "use_grouped", False)
    model = lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=EXPERTS))
    with pytest.raises(ConfigError, match="mixed-adapter batches"):
        model(input_ids=IDS, adapter_names=["default", "__base__"])


def test_parameter_targets_refuse_what_peft_refuses():
    with pytest.raises(ConfigError, match="lora_dropout"):
        lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=EXPERTS, lora_dropout=0.1))
    with pytest.raises(ConfigError, match="use_dora"):
        lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=EXPERTS, use_dora=True))
    with pytest.raises(ConfigError, match="matched no parameter"):
        lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=["experts.nope"]))
    model = lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=EXPERTS))
    with pytest.raises(ConfigError, match="same parameters"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_parameters=["experts.down_proj"]), "other")


def test_all_linear_adapts_experts_like_peft_but_never_the_router():
    model = lorakit.inject(base(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    cfg = adapter_configs(model)["default"]
    assert cfg.target_parameters == ["experts.down_proj", "experts.gate_up_proj"]
    experts = model.model.layers[0].mlp.experts
    assert experts.base_layer.r["default"] == 8 and experts.r["default"] == 4  # gate_up_proj fuses two: 2r
    assert not isinstance(model.model.layers[0].mlp.gate, lorakit.LoraLayer)
    pm = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    router = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and ".gate.lora_" in n)
    assert lorakit.trainable_parameters(model)[0] == pm.get_nb_trainable_parameters()[0] - router


def test_llama4_router_is_skipped_by_all_linear_and_refused_by_name():
    with pytest.warns(UserWarning, match="router"):
        model = lorakit.inject(base("llama4_text"), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    assert not isinstance(model.model.layers[0].feed_forward.router, lorakit.LoraLayer)
    logits(model)  # the forward pass works
    with pytest.raises(ConfigError, match="not a plain linear map"):
        lorakit.inject(base("llama4_text"), lorakit.LoraConfig(r=4, target_modules=["router"]))


def test_lorakit_file_of_a_different_model_is_refused(tmp_path):
    model = lorakit.inject(base(), lorakit.LoraConfig(r=4, target_parameters=EXPERTS))
    lorakit.save_adapter(model, tmp_path / "lk")
    with pytest.raises(AdapterFileError):
        lorakit.load_adapter(base("mixtral"), tmp_path / "lk")


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama4_text"])  # grouped path / effective-weight path
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, arch):
    _, d = peft_adapter(tmp_path, arch)
    assert_same_grads(trained_grads(d, arch), trained_grads(d, arch, checkpointing=True), rtol=1e-4, atol=1e-6)


def test_router_aux_loss_weight_follows_the_model_config():
    from lorakit.train import router_aux as moe
    model = base()
    assert moe.set_router_aux_loss(model, None) == 0.0  # the tiny config does not ask for router logits
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.02
    assert moe.set_router_aux_loss(model, None) == 0.02
    assert moe.set_router_aux_loss(model, 0.5) == 0.5
    model.train()
    out = model(input_ids=IDS, **moe.router_aux_kwargs(model))
    loss = torch.tensor(3.0)
    got = moe.add_router_aux(loss, out, 10, model).detach()
    assert float(got) == pytest.approx(3.0 + 0.5 * float(out.aux_loss.detach()) * 10)
    with pytest.raises(ConfigError):
        moe.set_router_aux_loss(base("llama"), 0.1)
