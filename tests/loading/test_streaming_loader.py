"""The streaming loader: same model as transformers' from_pretrained, far less memory, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError, ModelLoadError
from lorakit.loading import load_pretrained_streaming, open_checkpoint, stream_folder
from lorakit.loading.memwatch import run_measured
from lorakit.loading.synthetic import write_synthetic_checkpoint

SRC = str(Path(__file__).resolve().parents[2] / "src")


def llama_config(**kw):
    from transformers import LlamaConfig
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=320, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def config_100m():
    # 88M parameters: 12 Llama blocks (hidden 768, GQA 12/4 heads, MLP 2048) + untied 8192-token embedding/head
    return llama_config(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=4, vocab_size=8192)


@pytest.fixture(scope="module")
def ckpt100m(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m100") / "model"
    cfg = config_100m()
    params = 88_000_000
    return write_synthetic_checkpoint(cfg, folder, dtype=torch.bfloat16, shard_bytes=params * 2 // 4 + 2 ** 20)


@pytest.fixture
def tiny(tmp_path):
    from transformers import LlamaForCausalLM
    from train_fixtures import tiny_tokenizer
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = LlamaForCausalLM(llama_config(vocab_size=len(tok))).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def ids(n=9, vocab=300):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def test_four_shards_logits_equal_from_pretrained(ckpt100m):
    from transformers import AutoModelForCausalLM
    assert len(open_checkpoint(ckpt100m).files) == 4
    x = ids()
    with torch.no_grad():
        for dtype in (None, torch.float32):  # None: the stored bf16, as from_pretrained's default
            ref = AutoModelForCausalLM.from_pretrained(ckpt100m, dtype=dtype or torch.bfloat16).eval()
            got = stream_folder(ckpt100m, dtype=dtype).eval()
            assert got.dtype == ref.dtype == (dtype or torch.bfloat16)
            assert torch.equal(ref(x).logits, got(x).logits)
            del ref, got


def test_quantized_equals_lorakit_quantize_of_ordinary_load(ckpt100m):
    import lorakit
    from transformers import AutoModelForCausalLM
    x = ids()
    ref = lorakit.quantize(AutoModelForCausalLM.from_pretrained(ckpt100m, dtype=torch.float32).eval())
    got = stream_folder(ckpt100m, quantize="nf4", dtype=torch.float32, mmap_tables=False).eval()
    a, b = ref.state_dict(), got.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the default keeps the bf16 embedding and head as stored (mapped) and upcasts them where used: same values
    lean = stream_folder(ckpt100m, quantize="nf4", dtype=torch.float32).eval()
    c = lean.state_dict()
    assert c["model.embed_tokens.weight"].dtype == c["lm_head.weight"].dtype == torch.bfloat16
    for k in a:
        assert torch.equal(a[k], c[k].to(a[k].dtype)), k
    with torch.no_grad():
        want = ref(x).logits
        assert torch.equal(want, got(x).logits)
        assert lean(x).logits.dtype == torch.float32
        torch.testing.assert_close(lean(x).logits, want, rtol=1e-5, atol=1e-5)  # the head's GEMM blocks differ


MEASURE = """
import sys, torch, transformers, lorakit, lorakit.quant
from lorakit.loading import stream_folder
from lorakit.loading.memwatch import rss_anon
torch.set_num_threads(1)
lorakit.quant.require_backend("cpu")
print(rss_anon(), flush=True)
if sys.argv[2] == "nf4-gptq":  # as lorakit train does for quantized runs (GPTQ's per-layer work is transient)
    from lorakit.loading.allocator import return_freed_memory_promptly
    return_freed_memory_promptly()
cal = [torch.randint(0, 8000, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
m = stream_folder(sys.argv[1], quantize=sys.argv[2] if sys.argv[2] != "none" else None,
                  calibration=cal if sys.argv[2] == "nf4-gptq" else None)
print(rss_anon(), flush=True)
"""


@pytest.mark.parametrize("quantize, ceiling", [("none", 0.62), ("nf4", 0.40), ("nf4-gptq", 0.50)])
def test_peak_private_memory_well_below_fp32_size(ckpt100m, quantize, ceiling):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc, peak, out, err = run_measured([sys.executable, "-c", MEASURE, str(ckpt100m), quantize], env=env)
    assert rc == 0, err
    before, after = (int(v) for v in out.split())
    fp32 = sum(t.nbytes for t in open_checkpoint(ckpt100m).tensors.values()) * 2
    # bf16: the model (half the fp32 size) + one tensor; nf4: ~0.11 of fp32 for the 4-bit linears + 0.07 for
    # the bf16 embedding and head + allocator holes the per-layer trim leaves (~0.1, measured 0.30).
    # An fp32 load followed by quantization (the old path) needs >= 1.0, a bf16 load 0.5; nf4-gptq adds one
    # layer's GPTQ work (XᵀX, its inverse: ~0.15 here, a far smaller share of a real-size model), measured 0.46.
    assert (peak - before) < ceiling * fp32, (peak - before, fp32)
    assert (after - before) <= (peak - before)


def test_load_pretrained_streaming_finishes_like_load_model(tiny):
    from lorakit.models import load_model
    model, tok = load_pretrained_streaming(str(tiny))
    ref, rtok = load_model(str(tiny), dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    assert model.config._name_or_path == ref.config._name_or_path == str(tiny.resolve())
    assert tok.pad_token == rtok.pad_token and model.config.pad_token_id == ref.config.pad_token_id
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, ref(ids()).logits)


def test_tied_embeddings_share_one_tensor(tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    for q in (None, "nf4"):
        m = stream_folder(tmp_path, quantize=q)
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert m.model.rotary_emb.inv_freq.device.type == "cpu" and torch.isfinite(m.model.rotary_emb.inv_freq).all()


def file_backed(t: torch.Tensor) -> str | None:
    """Returns the file whose mapping holds t's data (from /proc/self/maps), None for anonymous memory."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 and parts[5].startswith("/") else None
    return None


def test_tables_are_views_of_the_checkpoint_map(tiny):
    """Embedding and head kept in their stored dtype are file-backed (mmap_tables, the default); converted to
    another dtype, or with mmap_tables=False, they are private copies. Logits are the same either way."""
    mapped = stream_folder(tiny, quantize="nf4")
    private = stream_folder(tiny, quantize="nf4", mmap_tables=False)
    converted = stream_folder(tiny, dtype=torch.float32)
    for m, want in ((mapped, True), (private, False), (converted, False)):
        for t in (m.model.embed_tokens.weight, m.lm_head.weight):
            assert (file_backed(t) or "").endswith(".safetensors") is want
        assert file_backed(m.model.layers[0].input_layernorm.weight) is None  # small: always private
    with torch.no_grad():
        assert torch.equal(mapped(ids()).logits, private(ids()).logits)
    # a write (a user training the table) copies the page into private memory; the file never changes
    before = (tiny / "model-00001-of-00002.safetensors").read_bytes() if (tiny / "model-00001-of-00002.safetensors"
                                                                          ).exists() else None
    with torch.no_grad():
        mapped.model.embed_tokens.weight[0].fill_(7)
    assert mapped.model.embed_tokens.weight[0, 0].item() == 7
    fresh = stream_folder(tiny, quantize="nf4")
    assert not torch.equal(fresh.model.embed_tokens.weight[0], mapped.model.embed_tokens.weight[0])
    if before is not None:
        assert (tiny / "model-00001-of-00002.safetensors").read_bytes() == before


def test_mapped_tables_leave_private_memory(ckpt100m):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    peaks = {}
    for mmap in (True, False):
        code = MEASURE.replace("quantize=sys.argv[2] if sys.argv[2] != \"none\" else None",
                               f"quantize='nf4', mmap_tables={mmap}")
        rc, peak, out, err = run_measured([sys.executable, "-c", code, str(ckpt100m), "nf4"], env=env)
        assert rc == 0, err
        before, after = (int(v) for v in out.split())
        peaks[mmap] = after - before
    tables = 2 * 8192 * 768 * 2  # untied bf16 embedding + head
    assert peaks[False] - peaks[True] > 0.8 * tables, peaks


# ---------------------------------------------------------------------------- bad inputs: one clear message
def _message(fn) -> str:
    with pytest.raises(ModelLoadError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg.strip() and "Traceback" not in msg
    return msg


def test_shard_missing_from_index(tiny):
    shard = sorted(tiny.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _message(lambda: stream_folder(tiny))
    assert shard.name in msg and "missing" in msg


def test_truncated_shard(tiny):
    shard = sorted(tiny.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    msg = _message(lambda: stream_folder(tiny))
    assert shard.name in msg and "truncated" in msg


def test_corrupt_header(tiny):
    shard = sorted(tiny.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    assert shard.name in _message(lambda: stream_folder(tiny))


def test_wrong_shape(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tiny / "config.json").write_text(json.dumps(cfg))
    msg = _message(lambda: stream_folder(tiny))
    assert "mlp" in msg and "shape" in msg and ".safetensors" in msg


def test_missing_tensor(tiny):
    index = tiny / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    index.write_text(json.dumps(data))
    msg = _message(lambda: stream_folder(tiny))
    assert "model.layers.1.mlp.down_proj.weight" in msg and "missing" in msg


def test_dtype_the_device_cannot_compute(tiny):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    msg = _message(lambda: stream_folder(tiny, dtype=torch.float8_e4m3fn))
    assert "cannot compute" in msg and "float8" in msg


def test_no_weights_and_bad_options(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_config().to_dict()))
    assert "no safetensors" in _message(lambda: stream_folder(tmp_path))
    with pytest.raises(LorakitError, match="quantize"):
        stream_folder(tmp_path, quantize="int3")
    with pytest.raises(LorakitError, match="does not exist"):
        load_pretrained_streaming(str(tmp_path / "nope"))


def test_gptq_block_by_block_beats_round_to_nearest(tmp_path):
    """nf4-gptq while streaming: same 4-bit format, closer to the full-precision model than round-to-nearest on
    held-out ids, and no linear left in full precision."""
    from transformers import LlamaForCausalLM
    from lorakit.ops.nf4 import is_quantized_layer
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(num_hidden_layers=3)).save_pretrained(tmp_path, max_shard_size="100KB")
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 320, (1, 48), generator=g) for _ in range(8)]
    held = torch.randint(0, 320, (2, 40), generator=g)
    with torch.no_grad():
        want = stream_folder(tmp_path, dtype=torch.float32).eval()(held).logits
        errs = {}
        for q in ("nf4", "nf4-gptq"):
            m = stream_folder(tmp_path, quantize=q, dtype=torch.float32,
                              calibration=calibration if q == "nf4-gptq" else None).eval()
            assert all(is_quantized_layer(m.get_submodule(f"model.layers.{i}.mlp.down_proj")) for i in range(3))
            assert not any(type(mod) is torch.nn.Linear and mod is not m.lm_head for mod in m.modules())
            errs[q] = float((m(held).logits - want).pow(2).mean())
    assert errs["nf4-gptq"] < 0.9 * errs["nf4"], errs
    with pytest.raises(LorakitError, match="calibration"):
        stream_folder(tmp_path, quantize="nf4-gptq")
