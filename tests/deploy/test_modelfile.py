"""--ollama DIR: a Modelfile with FROM / ADAPTER, the chat template translated to Ollama's Go template, stops."""
from __future__ import annotations

import pytest

from deploy_fixtures import add_adapter, save_tiny
from lorakit.cli import main
from lorakit.deploy.ollama import default_system, family, modelfile_text


def test_merged_export_writes_a_modelfile_beside_the_gguf(tmp_path):
    model = save_tiny("qwen2", tmp_path / "m")
    add_adapter(model, tmp_path / "ad")
    out = tmp_path / "ollama" / "model.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out", str(out),
                 "--ollama", str(tmp_path / "ollama")]) == 0
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("FROM model.gguf\n") and "ADAPTER" not in text
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_adapter_only_export_writes_base_and_adapter_lines(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text("template: alpaca\nsystem: Answer briefly.\n")
    out = tmp_path / "o" / "lora.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "run"), "--out", str(out),
                 "--adapter-only", "--ollama", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert "FROM lora-base.gguf\nADAPTER lora.gguf\n" in text and (tmp_path / "o" / "lora-base.gguf").exists()
    assert "### Instruction:" in text and 'SYSTEM """Answer briefly."""' in text  # the run's Alpaca template


@pytest.mark.parametrize("template,fam,stop", [
    ("{{ '<|im_start|>' + m['role'] }}", "chatml", "<|im_end|>"),
    ("{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' }}", "llama3", "<|eot_id|>"),
    ("{{ '<start_of_turn>' + role }}", "gemma", "<end_of_turn>"),
    ("{{ '<|user|>\n' + m['content'] + '<|end|>' }}", "phi3", "<|end|>"),
    ("{{ '[INST] ' + m['content'] + ' [/INST]' }}", "mistral", "[/INST]"),
])
def test_template_families(template, fam, stop):
    assert family(template) == fam
    text, got = modelfile_text("m.gguf", chat_template=template, eos="</s>")
    assert got == fam and f'PARAMETER stop "{stop}"' in text and 'PARAMETER stop "</s>"' in text


def test_unknown_template_writes_no_template_and_smollm_default_system_is_kept():
    text, fam = modelfile_text("m.gguf", chat_template="{{ messages }}")
    assert fam is None and "TEMPLATE" not in text
    smol = "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    assert default_system(smol) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
