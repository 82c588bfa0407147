"""QLoRA on MoE experts: `quantize(model)` stores routed experts' 3-D tensors as NF4 per expert (the router stays
full precision); LoRA on them (target_parameters) equals the dense equation on the dequantized weights, trains
only A and B, merges like the 4-bit linear path, and saves the same PEFT files. Tiny random Qwen3-MoE/Mixtral."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.layers.param import LoraParam
from lorakit.model.merge import RequantizationWarning
from lorakit.model.quantize import dequantize, is_quantized, quantize
from lorakit.ops.nf4 import is_4bit
from lorakit.ops.nf4_experts import NF4Experts, quantized_experts
from moe_fixtures import EXPERTS, IDS, base, logits, matrix  # noqa: F401

pytest.importorskip("bitsandbytes")

ARCHS = ["qwen3_moe", "mixtral"]


def qlora(arch="qwen3_moe", seed=0):
    """Returns a 4-bit model (experts included) with a random nonzero adapter on the expert tensors."""
    model = quantize(base(arch))
    torch.manual_seed(seed)
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS,
                                                    init_lora_weights=False))


def owners(model):
    return [m for m in model.modules() if quantized_experts(m)]


@pytest.fixture(params=[True, False], ids=["grouped", "effective-weight"])
def path(request, monkeypatch):
    monkeypatch.setattr(LoraParam, "use_grouped", request.param)
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_take_about_4_bits_and_the_router_stays_full_precision(arch):
    fp32 = base(arch)
    model = quantize(base(arch))
    experts = [m for n, m in fp32.named_modules() if n.endswith("mlp.experts")]
    dense_bytes = sum(p.numel() * 4 for m in experts for p in m.parameters() if p.dim() == 3)
    stores = [s for m in owners(model) for s in quantized_experts(m).values()]
    assert len(stores) == 2 * len(experts) and all(isinstance(s, NF4Experts) for s in stores)
    assert sum(s.nbytes() for s in stores) < 0.3 * dense_bytes
    for layer in model.model.layers:
        ex = layer.mlp.experts
        assert "gate_up_proj" not in ex._parameters and "down_proj" not in ex._parameters
        router = layer.mlp.gate
        assert not is_4bit(router.weight) and router.weight.dtype == torch.float32
        torch.testing.assert_close(router.weight, dict(fp32.named_modules())[
            f"model.layers.{layer.self_attn.layer_idx}.mlp.gate"].weight, rtol=0, atol=0)
    assert is_quantized(model)
    # the quantized base runs the model's own experts forward on the dequantized weights, nothing stays bound
    assert (logits(model) - logits(dequantize(copy.deepcopy(model)))).abs().max() <= 1e-5
    assert not any(k in ex.__dict__ for ex in owners(model) for k in ("gate_up_proj", "down_proj"))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_4bit_experts_equals_the_dense_equation_on_dequantized_weights(arch, path):
    model = qlora(arch)
    # W_e + s·B_e·A_e on dequant(W_e), folded into plain fp32 tensors: the dense equation, no lorakit forward left
    dense = lorakit.merge_and_unload(dequantize(copy.deepcopy(model)))
    assert not any(isinstance(m, LoraParam) for m in dense.modules())
    out, ref = logits(model), logits(dense)
    assert (out - logits(dequantize(lorakit.unload(copy.deepcopy(model))))).abs().max() > 1e-3  # adapter matters
    assert (out - ref).abs().max() <= 1e-4


def _grads(model, checkpointing=None):
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
def test_training_reaches_only_the_factors_with_the_dense_gradients(path, checkpointing):
    model = qlora()
    dense = dequantize(copy.deepcopy(model))  # same adapter on fp32 dequantized weights
    got, want = _grads(model, checkpointing), _grads(dense, checkpointing)
    assert got and all("lora_" in n for n in got)
    assert set(got) == set(want)
    for n in got:  # backward dequantized the saved experts again: the gradients equal the fp32 model's
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


def test_one_training_step_changes_only_the_lora_factors():
    model = qlora().train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    codes = [s.codes.clone() for m in owners(model) for s in quantized_experts(m).values()]
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(torch.equal(a, s.codes) for a, s in zip(codes, [s for m in owners(model)
                                                                for s in quantized_experts(m).values()]))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoraParam)]


def test_merge_requantizes_and_unmerge_and_merge_and_unload_behave_like_the_linear_path():
    model = qlora()
    w0 = [layer.read_base_fp32() for layer in _layers(model)]
    deltas = [layer.delta_weight("default") for layer in _layers(model)]
    lorakit.merge(model)  # into 4-bit experts: the merged tensor is quantized again, as on Linear4bit
    assert is_quantized(model)
    for layer, w, d in zip(_layers(model), w0, deltas):
        assert layer.merged_adapters == ["default"] and not layer.live
        torch.testing.assert_close(layer.read_base_fp32(), NF4Experts(w + d).dequantize(), rtol=0, atol=0)
    merged = [layer.read_base_fp32() for layer in _layers(model)]
    lorakit.unmerge(model)
    for layer, w, d in zip(_layers(model), merged, deltas):
        assert layer.live == ("default",)
        torch.testing.assert_close(layer.read_base_fp32(), NF4Experts(w - d).dequantize(), rtol=0, atol=0)
    exact = lorakit.merge_and_unload(copy.deepcopy(model))  # default: dequantized, exact merge
    assert not is_quantized(exact)
    assert exact.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        ref = lorakit.merge_and_unload(dequantize(copy.deepcopy(model)))
    assert (logits(exact) - logits(ref)).abs().max() <= 1e-5
    with pytest.warns(RequantizationWarning, match="re-quantizing"):
        requantized = lorakit.merge_and_unload(copy.deepcopy(model), requantize=True)
    assert is_quantized(requantized) and not any(isinstance(m, LoraParam) for m in requantized.modules())


def test_adapter_saved_from_4bit_experts_has_the_fp32_files_and_loads_into_the_fp32_base(tmp_path):
    from safetensors.torch import load_file
    model = qlora()
    lorakit.save_adapter(model, tmp_path / "q")
    torch.manual_seed(0)
    fp = lorakit.inject(base(), lorakit.LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS,
                                                   init_lora_weights=False))
    lorakit.save_adapter(fp, tmp_path / "f")
    q, f = load_file(str(tmp_path / "q" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "f" / "adapter_model.safetensors"))
    assert set(q) == set(f) and all(q[k].shape == f[k].shape for k in q)
    loaded = lorakit.load_adapter(quantize(base()), tmp_path / "q")
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-6
    on_fp32 = lorakit.load_adapter(base(), tmp_path / "q")
    assert all(torch.equal(q[k], f[k]) for k in q)  # same seed, same factors: the base's format leaves no trace
    assert (logits(on_fp32) - logits(fp)).abs().max() <= 1e-6


def test_quantize_after_inject_gives_the_same_model():
    torch.manual_seed(0)
    after = lorakit.inject(base(), lorakit.LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS,
                                                      init_lora_weights=False))
    quantize(after)
    before = qlora()
    assert (logits(after) - logits(before)).abs().max() <= 1e-6


def test_every_layer_dequantizes_into_the_same_two_buffers():
    from lorakit.ops import nf4_experts
    model = qlora().train()
    nf4_experts.free_workspace()
    model(input_ids=IDS, labels=IDS).loss.backward()
    pool = nf4_experts._local.pool  # one buffer per tensor name (gate_up_proj and down_proj are read together)
    assert sorted(k[2] for k in pool) == ["down_proj", "gate_up_proj"]
    size = {n: s.shape.numel() for m in owners(model) for n, s in quantized_experts(m).items()}
    assert all(buf.numel() == size[k[2]] for k, buf in pool.items())


def test_streaming_loader_quantizes_fused_expert_tensors_as_it_reads_them(tmp_path):
    from safetensors.torch import save_file
    from lorakit.loading.streaming import stream_folder
    fp32 = base()
    fp32.config.save_pretrained(tmp_path)  # fused 3-D tensors under the model's own names (no conversion needed)
    save_file({k: v.contiguous().clone() for k, v in fp32.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    model = stream_folder(tmp_path, quantize="nf4")
    assert len(owners(model)) == len(model.model.layers) and not is_4bit(model.model.layers[0].mlp.gate.weight)
    assert (logits(model) - logits(quantize(base()))).abs().max() <= 1e-5


def test_memory_report_counts_4bit_experts_as_quantized_parameters():
    from lorakit.model.memory import memory_report
    model = quantize(base())
    stores = [s for m in owners(model) for s in quantized_experts(m).values()]
    report = memory_report(model)
    linear = sum(m.in_features * m.out_features for m in model.modules() if is_4bit(m))  # attention projections
    assert report["quantized_params"] == linear + sum(s.shape.numel() for s in stores)
    assert 4 < report["bits_per_quantized_param"] < 5


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_the_models_other_experts_implementations_read_the_4bit_experts(implementation):
    # eager indexes one expert at a time (autograd saves per-expert views: backward dequantizes just that expert)
    model = qlora()
    dense = dequantize(copy.deepcopy(model))
    for m in (model, dense):
        m.config._experts_implementation = implementation
    assert model.model.layers[0].mlp.experts.owner.config._experts_implementation == implementation
    assert (logits(model) - logits(dense)).abs().max() <= 1e-4
    got, want = _grads(model), _grads(dense)
    assert set(got) == set(want)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


def test_mixed_adapter_batches_on_4bit_experts(tmp_path):
    lorakit.save_adapter(qlora(seed=1), tmp_path / "b")
    model = qlora()
    lorakit.load_adapter(model, tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["b", "__base__"]).logits
    lorakit.set_adapter(model, "b")
    torch.testing.assert_close(mixed[0], logits(model)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits(lorakit.unload(model))[1], rtol=1e-5, atol=1e-5)


def test_requantizing_merge_without_example_inputs_reports_the_expert_weight_change(monkeypatch):
    import lorakit.model.merge as merge_module
    monkeypatch.setattr(merge_module, "default_example_inputs", lambda model: None)
    with pytest.warns(RequantizationWarning, match=r"max \|weight difference\| = (?!0 )"):
        lorakit.merge_and_unload(qlora(), requantize=True)


def test_4bit_experts_survive_pickling_and_a_dtype_cast(tmp_path):
    model = qlora()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.model.layers[0].mlp.experts.owner.forward.owner is loaded.model.layers[0].mlp.experts.owner
    assert (logits(loaded) - logits(model)).abs().max() == 0
    stats = [s.absmax2.clone() for m in owners(model) for s in quantized_experts(m).values()]
    model.to(torch.bfloat16)  # the statistics stay exact; the dequantized experts follow the cast
    assert all(torch.equal(a, s.absmax2) for a, s in zip(stats, [s for m in owners(model)
                                                                  for s in quantized_experts(m).values()]))
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_parameter_counts_and_the_saved_base_identity_include_the_4bit_experts():
    from lorakit.io.peft_format import base_identity
    from lorakit.model.summary import trainable_parameters
    fp, q = base(), quantize(base())
    assert base_identity(q)["base_parameters"] == base_identity(fp)["base_parameters"]
    assert trainable_parameters(q)[1] == trainable_parameters(fp)[1]


@pytest.mark.parametrize("shape,double_quant", [((6, 128, 64), True), ((5, 96, 40), True), ((3, 64, 64), False)])
def test_one_call_dequantization_equals_expert_by_expert(shape, double_quant, monkeypatch):
    torch.manual_seed(0)
    store = NF4Experts(torch.randn(shape) * 0.02, double_quant=double_quant)
    fused = store.dequantize()
    monkeypatch.setattr(NF4Experts, "fused_dequantize", False)
    torch.testing.assert_close(fused, store.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(store.dequantize(first=1, last=3), fused[1:3], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt_oss", "llama4_text", "deepseek_v3"])
def test_other_moe_layouts_equal_their_dequantized_model(arch):
    # gpt-oss stores experts transposed with biases; Llama 4's experts have their own forward
    model = qlora(arch)
    dense = dequantize(copy.deepcopy(model))
    assert owners(model) and (logits(model) - logits(dense)).abs().max() <= 1e-5
    got, want = _grads(model), _grads(dense)
    assert got and set(got) == set(want)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
