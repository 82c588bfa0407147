"""Regional torch.compile (lorakit.compiling, `lorakit train --compile`): the compiled training step gives the
eager step's loss and LoRA gradients; evaluation stays eager; bad setups are clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.model.compiling import compile_blocks, has_cxx_compiler, repeated_blocks, uncompile_blocks
from lorakit.errors import ConfigError, LorakitError
from lorakit.train.options import load_options

needs_compiler = pytest.mark.skipif(not has_cxx_compiler(), reason="torch.compile's CPU kernels need a C++ compiler")


def tiny_lora_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B != 0, so the LoRA path changes the loss and A gets gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_repeated_blocks_are_the_decoder_layers():
    model = tiny_lora_llama()
    assert repeated_blocks(model) == list(model.model.layers)


def test_repeated_blocks_fall_back_to_a_same_class_module_list():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))

    stack = Stack()
    assert repeated_blocks(stack) == list(stack.blocks)
    with pytest.raises(LorakitError, match="no repeated blocks"):
        compile_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


@needs_compiler
def test_compiled_training_step_matches_eager_and_eval_stays_eager():
    from torch._dynamo.utils import counters
    eager = tiny_lora_llama().train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    assert compile_blocks(compiled) == 2  # idempotent: blocks are wrapped once
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    graphs = counters["stats"]["unique_graphs"]
    losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path really ran
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (eager, compiled)]
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 28  # A and B of 7 projections x 2 layers
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)

    graphs = counters["stats"]["unique_graphs"]
    compiled.eval()
    eager.eval()
    with torch.no_grad():  # eval and generation take the eager forward: bit-equal, nothing new compiled
        assert torch.equal(compiled(input_ids=ids).logits, eager(input_ids=ids).logits)
    assert counters["stats"]["unique_graphs"] == graphs
    assert uncompile_blocks(compiled) == 2
    assert "forward" not in vars(compiled.model.layers[0])


def test_compile_with_a_4bit_base_is_a_clear_error():
    with pytest.raises(ConfigError, match="compile: does not work with quantize=nf4"):
        load_options(None, ["compile=true", "quantize=nf4"])
