"""`lorakit merge` shard by shard: equal to lorakit.merge_and_unload, in the base's sharding and dtype (or
--dtype), holding about one shard in memory; QLoRA adapters are merged into the full-precision weights."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from deploy_fixtures import add_adapter, save_tiny
from lorakit.cli import main


def _state(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sharded_merge_equals_merge_and_unload(tmp_path):
    model = save_tiny("llama", tmp_path / "m", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(shards) >= 3
    add_adapter(model, tmp_path / "ad")
    want = lorakit.merge_and_unload(model).state_dict()
    assert main(["merge", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    got = _state(tmp_path / "o")
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert (tmp_path / "o" / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # loads without lorakit


@pytest.mark.parametrize("dtype,want", [(None, torch.bfloat16), ("fp32", torch.float32), ("fp16", torch.float16)])
def test_merge_keeps_the_base_dtype_unless_told(dtype, want, tmp_path):
    model = save_tiny("qwen2", tmp_path / "m", dtype=torch.bfloat16)
    add_adapter(model.float(), tmp_path / "ad")
    argv = ["merge", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "o")]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    got = _state(tmp_path / "o")
    assert all(t.dtype == want for t in got.values())
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == str(want).replace("torch.", "")


def test_dora_adapter_merges_like_lorakit(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "ad", use_dora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1.1)
    lorakit.save_adapter(model, tmp_path / "ad")
    want = lorakit.merge_and_unload(model).state_dict()
    assert main(["merge", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "o")]) == 0
    got = _state(tmp_path / "o")
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k


def test_qlora_adapter_is_merged_into_full_precision_weights_and_says_so(tmp_path):
    from lorakit.deploy.sharded_merge import merge_sharded
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text("quantize: nf4\nmodel: x\n")
    said = []
    merge_sharded(tmp_path / "m", str(tmp_path / "run"), tmp_path / "o", log=said.append)
    assert any("nf4" in s and "original full-precision weights" in s for s in said)
    want = lorakit.merge_and_unload(model).state_dict()
    got = _state(tmp_path / "o")
    assert torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], want["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)


def test_bad_shards_are_clear_errors(tmp_path, capsys):
    add_adapter(save_tiny("llama", tmp_path / "m", max_shard_size="200KB"), tmp_path / "ad")
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])                       # truncated
    capsys.readouterr()
    assert main(["merge", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "o")]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "o").exists()
    shard.unlink()                                                     # missing
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(tmp_path / "o.gguf")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()


PEAK = textwrap.dedent("""
    import sys, threading, time, json
    from pathlib import Path
    import torch
    from lorakit.deploy.sharded_merge import merge_sharded
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    base = anon(); peak = [base]; done = []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    merge_sharded(sys.argv[1], sys.argv[2], sys.argv[3], log=lambda m: None)
    done.append(1); t.join()
    print(json.dumps({"base": base, "peak": peak[0]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc")
def test_peak_memory_is_about_one_shard(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=8, vocab_size=8000))
    model.save_pretrained(tmp_path / "m", max_shard_size="20MB")
    total = sum(p.numel() * 4 for p in model.state_dict().values())
    shards = list((tmp_path / "m").glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    assert len(shards) >= 4
    add_adapter(model, tmp_path / "ad")
    del model
    r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "m"), str(tmp_path / "ad"), str(tmp_path / "o")],
                       capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["base"]
    print(f"merge peak RssAnon growth {grew / 2**20:.1f} MiB; largest shard {largest / 2**20:.1f} MiB; model {total / 2**20:.1f} MiB")
    assert grew < largest + (24 << 20), (grew, largest, total)         # at most about one shard
    assert grew < 0.6 * total, (grew, total)                           # far below the whole model
