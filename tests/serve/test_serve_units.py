"""The serve pieces on their own: text streaming with stop strings, sampling, the batch cache, adapter paths."""
from __future__ import annotations

import threading

import pytest
import torch

import serve_helpers
from serve_helpers import adapter_root  # noqa: F401 (fixtures)


def test_text_stream_holds_back_stop_prefixes_and_cuts_at_stop():
    from lorakit.serve.sampling import TextStream

    tok = serve_helpers.tokenizer()
    ids = tok("red cat blue dog green")["input_ids"]
    s = TextStream(tok, ["blue d"])
    out, stopped = "", False
    for t in ids:
        delta, stopped = s.push(t)
        out += delta
        if stopped:
            break
    assert stopped and out == "red cat "
    s = TextStream(tok, ["zzz"])
    out = "".join(s.push(t)[0] for t in ids) + s.finish()
    assert out == "red cat blue dog green"


def test_sampler_greedy_seeded_and_top_p():
    from lorakit.serve.sampling import Sampler, SamplingParams

    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=3))(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {s(logits) for _ in range(30)} == {1}  # token 1 alone holds >= half the mass


def test_batch_cache_join_and_keep():
    from transformers import DynamicCache

    from lorakit.serve.kv import BatchCache
    model = serve_helpers.model(serve_helpers.tokenizer())

    def prefill(n):
        c = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.arange(3, 3 + n)[None], past_key_values=c, use_cache=True)
        return c

    b = BatchCache()
    b.join(prefill(5), torch.ones(1, 5, dtype=torch.long))
    b.join(prefill(2), torch.ones(1, 2, dtype=torch.long))
    assert b.mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    k = b.cache.layers[0].keys
    assert k.shape[0] == 2 and k.shape[2] == 5 and k[1, :, :3].abs().sum() == 0
    b.keep([1])  # the short row alone: its padding columns go
    assert b.mask.tolist() == [[1, 1]] and b.cache.layers[0].keys.shape[2] == 2
    b.keep([])
    assert b.rows == 0 and b.cache is None


def test_resolve_adapter_dir_layouts(tmp_path):
    from lorakit.io.adapter_paths import resolve_adapter_dir
    from lorakit.serve.paths import path_under_root
    from lorakit.errors import AdapterFileError, ConfigError

    ad = tmp_path / "run" / "adapter"
    ad.mkdir(parents=True)
    (ad / "adapter_config.json").write_text("{}")
    assert resolve_adapter_dir(ad) == ad and resolve_adapter_dir(tmp_path / "run") == ad
    stopped = tmp_path / "stopped"
    for step, complete in ((2, True), (4, False)):
        d = stopped / "checkpoints" / f"step-{step:06d}"
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_config.json").write_text("{}")
        if complete:
            (d / "complete").write_text("ok")
    assert resolve_adapter_dir(stopped) == stopped / "checkpoints" / "step-000002" / "adapter"
    assert resolve_adapter_dir(stopped / "checkpoints" / "step-000004") == \
        stopped / "checkpoints" / "step-000004" / "adapter"
    with pytest.raises(AdapterFileError):
        resolve_adapter_dir(tmp_path / "nothing")
    with pytest.raises(AdapterFileError):
        resolve_adapter_dir(stopped / "checkpoints")
    assert path_under_root("run/adapter", tmp_path) == ad.resolve()
    for bad in ("../x", "/etc", "run/../../x"):
        with pytest.raises(ConfigError):
            path_under_root(bad, tmp_path)


def test_nf4_base_serves_adapters(adapter_root):
    pytest.importorskip("bitsandbytes")
    import lorakit
    from lorakit.serve.engine import Request
    from lorakit.serve.launch import build_engine
    from lorakit.serve.sampling import SamplingParams

    tok = serve_helpers.tokenizer()
    model = lorakit.quantize(serve_helpers.model(tok)) or serve_helpers.model(tok)
    engine = build_engine(model, tok, [("a", str(adapter_root / "a")), ("b", str(adapter_root / "b"))]).start()
    try:
        texts = {}
        for name in ("a", "b", None):
            done, parts = threading.Event(), []
            engine.submit(Request(tok("red cat")["input_ids"], name, SamplingParams(max_tokens=6, temperature=0),
                                  lambda k, d, parts=parts, done=done: parts.append(d) if k == "text" else done.set()))
            assert done.wait(60)
            texts[name] = "".join(parts)
        assert len(set(texts.values())) == 3
    finally:
        engine.stop(30)
