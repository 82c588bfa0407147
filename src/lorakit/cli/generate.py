"""`lorakit generate`: answer a prompt with a base model plus a LoRA adapter, in the training template.

    lorakit generate --adapter runs/X/adapter "Classify the sentiment of: I love it"
    lorakit generate --model DIR --adapter runs/X/adapter --input "some context" "instruction"
    lorakit generate --adapter runs/X/adapter --chat          interactive; an empty line or Ctrl-D ends it

The prompt is rendered exactly as training renders an Alpaca record's prompt (instruction, optional input),
with the template and system prompt of the run that wrote the adapter unless --template/--system say otherwise.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `generate` and returns its parser."""
    p = subparsers.add_parser("generate", help="generate text with a model and (optionally) a LoRA adapter",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the instruction (omit with --chat)")
    p.add_argument("--model", default=None, help="base model (default: the run's model, else the embedded default)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder run its own Python code (off by default)")
    p.add_argument("--adapter", default=None, help="adapter folder (PEFT format), a run folder or a checkpoint folder")
    p.add_argument("--input", default="", help="Alpaca 'input' field: context for the instruction (default: none)")
    p.add_argument("--template", choices=("auto", "chat", "alpaca"), default=None,
                   help="prompt template (default: the adapter's run template, else auto)")
    p.add_argument("--system", default=None, help="system prompt for chat templates (default: the run's)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                   help="dtype of the base's weights that are not 4-bit (default: the adapter's run's, else auto: "
                        "float32 on CPU, the checkpoint's stored dtype on CUDA)")
    p.add_argument("--quantize", choices=("none", "nf4", "nf4-gptq"), default=None,
                   help="quantize the base to 4-bit NF4 before loading the adapter, as QLoRA trains it; nf4-gptq "
                        "redoes the run's GPTQ calibration (default: what the adapter's run used, else none)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default: 128)")
    p.add_argument("--chat", action="store_true", help="interactive mode: read prompts from stdin until empty line/EOF")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs `lorakit generate`; returns the exit status."""
    from lorakit.errors import ConfigError
    from lorakit.train.data import render_prompt
    from lorakit.train.evaluate import greedy_generate
    from lorakit.train.recipe import load_for_inference

    if not args.chat and not args.prompt:
        raise ConfigError("give a prompt (lorakit generate \"...\") or use --chat for interactive mode")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer, template, system = load_for_inference(args.model, args.adapter, args.template, args.system,
                                                            trust_remote_code=args.trust_remote_code,
                                                            quantize=args.quantize, dtype=args.dtype)

    def answer(text: str, context: str = "") -> str:
        prompt = render_prompt({"instruction": text, "input": context}, tokenizer, template, system)
        return greedy_generate(model, tokenizer, [prompt], args.max_new_tokens, 1)[0].strip()

    if not args.chat:
        print(answer(args.prompt, args.input))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        print(answer(line.strip()), flush=True)
