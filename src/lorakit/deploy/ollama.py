"""An Ollama Modelfile for exported GGUF files: FROM, ADAPTER, TEMPLATE, SYSTEM and PARAMETER stop.

Ollama templates are Go templates, not Jinja, so the model's chat template is recognised by family and
replaced by the equivalent Go template (Ollama's own library templates):

    family      recognised by (in the Jinja template)      stop tokens
    chatml      <|im_start|>   SmolLM2, Qwen2/2.5/3         <|im_start|> <|im_end|>
    llama3      <|start_header_id|>                        <|start_header_id|> <|end_header_id|> <|eot_id|>
    gemma       <start_of_turn>                            <start_of_turn> <end_of_turn>
    phi3        <|user|> ... <|end|>                       <|end|> <|user|> <|assistant|>
    mistral     [INST]                                     [INST] [/INST]

A run trained with lorakit's Alpaca template (config.yaml template: alpaca) gets the Alpaca prompt instead, and
the run's system prompt (or the chat template's built-in default system message) becomes SYSTEM.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lorakit.deploy.output import atomic_file

TEMPLATES = {
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"]),
    "llama3": ('<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
               '<|start_header_id|>assistant<|end_header_id|>\n\n',
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "gemma": ('<bos>{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}<start_of_turn>user\n'
              '{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ $m.Content }}<end_of_turn>\n'
              '{{- else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n{{- end }}{{- end }}'
              '<start_of_turn>model\n', ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ('{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}'
             '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
             ["<|end|>", "<|user|>", "<|assistant|>"]),
    "mistral": ('{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}[INST] '
                '{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ $m.Content }}[/INST]'
                '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{- end }}{{- end }}', ["[INST]", "[/INST]"]),
    "alpaca": ('{{ if .System }}{{ .System }}\n\n{{ else }}Below is an instruction that describes a task. Write a '
               'response that appropriately completes the request.\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n'
               '### Response:\n', ["### Instruction:"]),
}


def family(chat_template: str | None) -> str | None:
    """The template family of a Jinja chat template (see the table above), None when not recognised."""
    t = chat_template or ""
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
                         ("<|user|>", "phi3"), ("[INST]", "mistral")):
        if marker in t:
            return name
    return None


def default_system(chat_template: str | None) -> str | None:
    """The system message a ChatML template inserts when none is given (SmolLM2 has one), else None."""
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>", chat_template or "")
    return m.group(1) if m and "{{" not in m.group(1) else None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(model: str, adapter: str | None = None, chat_template: str | None = None,
                   run: dict | None = None, eos: str | None = None) -> tuple[str, str | None]:
    """Returns (Modelfile text, template family or None)."""
    run = run or {}
    fam = "alpaca" if run.get("template") == "alpaca" else family(chat_template)
    lines = [f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if fam is not None:
        template, stops = TEMPLATES[fam]
        lines.append(f"TEMPLATE {_quote(template)}")
    else:
        stops = []
    system = run.get("system") or (default_system(chat_template) if fam == "chatml" else None)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for s in dict.fromkeys(stops + ([eos] if eos else [])):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    return "\n".join(lines) + "\n", fam


def write_modelfile(folder: str | Path, model: Path, adapter: Path | None = None, chat_template: str | None = None,
                    run: dict | None = None, eos: str | None = None, log=print) -> Path:
    """Writes folder/Modelfile (paths relative to the folder when the GGUF files are inside it); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        r = os.path.relpath(p.resolve(), folder.resolve())
        return r if not r.startswith("..") else str(p.resolve())
    text, fam = modelfile_text(rel(model), rel(adapter) if adapter else None, chat_template, run, eos)
    path = folder / "Modelfile"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    how = (f"TEMPLATE from the {fam} family" if fam else
           "no TEMPLATE (the chat template was not recognised: add one by hand, Ollama's default is the raw prompt)")
    log(f"wrote {path} ({how}); create the model with: ollama create NAME -f {path}")
    return path
