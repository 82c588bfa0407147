"""The embedded SmolLM2-135M served with a non-zero adapter: chat answers, and batching changes no answer."""
from __future__ import annotations

import threading

import pytest
import torch

import serve_helpers


@pytest.mark.slow
def test_embedded_model_with_an_adapter(tmp_path):
    import lorakit
    from lorakit.loading.pretrained import load_model
    from lorakit.serve.app import create_app
    from lorakit.serve.launch import build_engine

    model, tok = load_model(None)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lorakit.save_adapter(model, tmp_path / "style")
    reference = lorakit.merge_and_unload(model)  # base + adapter folded in: what the adapter rows must say

    served, tok = load_model(None)
    engine = build_engine(served, tok, [("style", str(tmp_path / "style"))])
    live = serve_helpers.LiveServer(create_app(engine, base_name="smollm2"), engine)
    try:
        client = live.client()
        questions = ["What is the capital of France?", "Name a color.", "Say hello.", "What is 2+2?"]
        bodies = [dict(model=m, messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0)
                  for q in questions for m in ("smollm2", "style")]
        alone = [client.chat.completions.create(**b).choices[0].message.content for b in bodies]
        assert all(alone) and any(alone[i] != alone[i + 1] for i in range(0, len(alone), 2))
        together: list = [None] * len(bodies)

        def send(i):
            together[i] = live.client().chat.completions.create(**bodies[i]).choices[0].message.content
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert together == alone
        assert engine.peak_batch > 1

        # the adapter rows equal plain generate() with the adapter merged into the base
        text = tok.apply_chat_template([{"role": "user", "content": questions[0]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=12, do_sample=False)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == alone[1]
    finally:
        live.close()
