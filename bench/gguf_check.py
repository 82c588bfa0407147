"""GGUF export checked by llama.cpp itself (issue 18).

    python bench/gguf_check.py [--run DIR] [--prompts 20] [--new-tokens 32] [--results bench/results]

1. Fine-tunes the embedded SmolLM2-135M for 5 steps (`lorakit train`, reused when --run already holds an adapter).
2. Exports with `lorakit export` (timed, peak private memory sampled from /proc/PID/status RssAnon): the merged
   model in f32, f16, q8_0 and llama.cpp's Q4_K_M; the base alone in f32/f16; the adapter alone (GGUF LoRA).
3. Greedy continuations of held-out prompts (the embedded dataset's eval split, rendered as training renders them)
   by lorakit (the unmerged adapter on the fp32 model) and by llama.cpp (llama-cpp-python) from each file, compared
   token for token; plus the largest logit difference along lorakit's own continuation (teacher forcing).
   llama.cpp runs with an f32 KV cache so that the numbers measure the export, not the cache.
4. Runs llama.cpp's reference converters (convert_hf_to_gguf.py on the merged folder, convert_lora_to_gguf.py on
   the adapter; taken from the llama-cpp-python sdist into ${LORAKIT_CACHE:-~/.cache/lorakit}/llama_cpp_ref) and
   compares tensor names, shapes, types and metadata keys with lorakit's files.
Writes bench/results/gguf_check.json and gguf_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def cache_root() -> Path:
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def run_measured(argv: list[str], env=None) -> dict:
    """Runs a command; returns {seconds, cpu_seconds, peak_rss_anon_mib, rc, tail}, sampling RssAnon every 10 ms.
    cpu_seconds (user + system of the child) is the number to compare on a shared machine, where wall time
    depends on the other processes."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]

    def sample():
        while p.poll() is None:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.01)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_anon_mib": round(peak[0] / 2**20, 1),
            "rc": p.returncode, "tail": out.strip().splitlines()[-3:]}


def lorakit_cmd(*args) -> list[str]:
    return [PY, "-m", "lorakit", *[str(a) for a in args]]


def env_with_src() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------------------------ lorakit side
def reference_generations(adapter: Path, n_prompts: int, new_tokens: int):
    """Returns (prompts as token ids, lorakit's greedy continuations, fp32 logits along them, eos id, prompt texts)."""
    import torch

    import lorakit
    from lorakit.loading.pretrained import load_model
    from lorakit.train.data import embedded_dataset, render_prompt
    from lorakit.train.evaluate import encode_prompt

    torch.set_num_threads(2)
    model, tok = load_model(None)
    lorakit.load_adapter(model, adapter)
    model.eval()
    settings = {}
    cfg = adapter.parent / "config.yaml"
    if cfg.is_file():
        import yaml
        settings = yaml.safe_load(cfg.read_text()) or {}
    records = embedded_dataset()["eval"][:n_prompts]
    prompts, conts, logits, texts = [], [], [], []
    for r in records:
        texts.append(render_prompt(r, tok, settings.get("template", "auto"), settings.get("system")))
        ids = encode_prompt(tok, texts[-1])
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            full = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1: len(ids) + len(gen) - 1].float().numpy()
        prompts.append(ids)
        conts.append(gen)
        logits.append(full)
    return prompts, conts, logits, tok.eos_token_id, texts


# ------------------------------------------------------------------------------------------------ llama.cpp side
def llama_cpp_check(model_path: Path, lora: Path | None, prompts, conts, ref_logits, eos: int, new_tokens: int) -> dict:
    """llama.cpp's greedy tokens vs lorakit's, and the largest logit difference along lorakit's continuation."""
    import llama_cpp

    from lorakit.deploy.llama_cpp import greedy_tokens

    outs = greedy_tokens(model_path, prompts, new_tokens, eos, lora)
    same = sum(got == want for got, want in zip(outs, conts))
    first_diff = [next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                  for got, want in zip(outs, conts) if got != want]
    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(model_path), n_ctx=512, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)
    max_diff = 0.0
    try:
        for ids, want, ref in zip(prompts, conts, ref_logits):   # teacher forcing along lorakit's continuation
            llm.reset()
            llm.eval(ids + want)
            mine = np.array(llm.scores[len(ids) - 1: len(ids) + len(want) - 1])
            max_diff = max(max_diff, float(np.abs(mine - ref).max()))
    finally:
        llm.close()
    return {"identical": same, "n": len(prompts), "first_difference_at_token": first_diff,
            "max_abs_logit_diff": round(max_diff, 5), "tokens": outs}


# ------------------------------------------------------------------------------------------------ reference converters
def gguf_summary(path: Path) -> dict:
    import gguf
    r = gguf.GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:
            v = None
        meta[k] = v if not isinstance(v, list) or len(v) < 8 else f"<list of {len(v)}>"
    tensors = {t.name: [list(int(d) for d in reversed(list(t.shape))), t.tensor_type.name] for t in r.tensors}
    return {"meta": meta, "tensors": tensors}


def max_data_diff(ours: Path, ref: Path) -> float:
    """The largest element difference between same-named float tensors of two GGUF files."""
    import gguf
    ra, rb = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(ref))
    tb = {t.name: t for t in rb.tensors}
    worst = 0.0
    for t in ra.tensors:
        u = tb.get(t.name)
        if u is not None and t.tensor_type == u.tensor_type and t.tensor_type.name in ("F32", "F16"):
            worst = max(worst, float(np.abs(np.asarray(t.data, np.float32) - np.asarray(u.data, np.float32)).max()))
    return worst


def compare(ours: Path, ref: Path) -> dict:
    a, b = gguf_summary(ours), gguf_summary(ref)
    ta, tb = a["tensors"], b["tensors"]
    shape_diff = {n: {"lorakit": ta[n], "reference": tb[n]} for n in ta.keys() & tb.keys() if ta[n] != tb[n]}
    keys_a, keys_b = set(a["meta"]), set(b["meta"])
    value_diff = {k: {"lorakit": a["meta"][k], "reference": b["meta"][k]} for k in keys_a & keys_b
                  if a["meta"][k] != b["meta"][k]}
    return {"tensors_only_lorakit": sorted(ta.keys() - tb.keys()), "tensors_only_reference": sorted(tb.keys() - ta.keys()),
            "tensor_shape_or_type_differences": shape_diff, "tensor_count": [len(ta), len(tb)],
            "metadata_only_lorakit": sorted(keys_a - keys_b), "metadata_only_reference": sorted(keys_b - keys_a),
            "metadata_value_differences": value_diff, "max_tensor_data_diff": max_data_diff(ours, ref)}


def reference_converters(ref_dir: Path, merged_folder: Path, base_folder: Path, adapter: Path, work: Path) -> dict:
    if not (ref_dir / "convert_hf_to_gguf.py").is_file():
        return {"skipped": f"no reference converters in {ref_dir} (extract vendor/llama.cpp/convert_*.py, conversion/ "
                           f"and gguf-py/ from the llama-cpp-python sdist there)"}
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ref_dir / 'gguf-py'}{os.pathsep}{ref_dir}"
    out = {}
    ref_model, ref_lora = work / "ref_merged_f32.gguf", work / "ref_adapter_f32.gguf"
    r1 = run_measured([PY, str(ref_dir / "convert_hf_to_gguf.py"), str(merged_folder), "--outtype", "f32",
                       "--outfile", str(ref_model)], env=env)
    r2 = run_measured([PY, str(ref_dir / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base_folder),
                       "--outtype", "f32", "--outfile", str(ref_lora)], env=env)
    out["convert_hf_to_gguf"] = {k: r1[k] for k in ("seconds", "peak_rss_anon_mib", "rc", "tail")}
    out["convert_lora_to_gguf"] = {k: r2[k] for k in ("seconds", "peak_rss_anon_mib", "rc", "tail")}
    if r1["rc"] == 0:
        out["merged_vs_reference"] = compare(work / "merged_f32.gguf", ref_model)
    if r2["rc"] == 0:
        out["adapter_vs_reference"] = compare(work / "adapter_f32.gguf", ref_lora)
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(cache_root() / "bench" / "gguf_check_run"), help="training run folder (reused)")
    ap.add_argument("--work", default=str(cache_root() / "bench" / "gguf_check_files"), help="folder for the GGUF files")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--ref", default=str(cache_root() / "llama_cpp_ref"), help="folder with llama.cpp's converters")
    a = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("gguf_check needs llama-cpp-python: pip install 'lorakit[gguf-check]'", file=sys.stderr)
        return 2
    run, work = Path(a.run), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = env_with_src()
    result = {"llama_cpp_python": llama_cpp.__version__, "machine": os.uname().machine, "cpus": os.cpu_count()}
    if not (run / "adapter" / "adapter_config.json").is_file():
        r = run_measured(lorakit_cmd("train", "--max-steps", 5, "--no-accuracy", "--no-baseline-eval", "--eval-every", 0,
                                     "--no-progress", "--out", run), env=env)
        result["train"] = r
        if r["rc"] != 0:
            print("\n".join(r["tail"]), file=sys.stderr)
            return 1
    adapter = run / "adapter"
    idle = run_measured([PY, "-c", "import torch, transformers, gguf, lorakit.deploy.gguf, safetensors"], env=env)
    result["import_only_peak_rss_anon_mib"] = idle["peak_rss_anon_mib"]
    exports = {}
    jobs = {"merged_f32": ["--adapter", run, "--outtype", "f32"], "merged_f16": ["--adapter", run, "--outtype", "f16"],
            "merged_q8_0": ["--adapter", run, "--outtype", "q8_0"],
            "merged_Q4_K_M": ["--adapter", run, "--quantize", "Q4_K_M"],
            "base_f32": ["--outtype", "f32"], "base_f16": ["--outtype", "f16"],
            "adapter_f32": ["--adapter", run, "--adapter-only", "--outtype", "f32"],
            "adapter_f16": ["--adapter", run, "--adapter-only", "--outtype", "f16"]}
    for name, extra in jobs.items():
        r = run_measured(lorakit_cmd("export", "--out", work / f"{name}.gguf", "--force", *extra), env=env)
        r["mb"] = round((work / f"{name}.gguf").stat().st_size / 1e6, 1) if r["rc"] == 0 else None
        exports[name] = r
        print(f"export {name}: {r['seconds']} s ({r['cpu_seconds']} s CPU), peak RssAnon {r['peak_rss_anon_mib']} MiB, rc {r['rc']}", flush=True)
    result["exports"] = exports
    from lorakit.deploy.sources import base_folder, read_checkpoint
    base = base_folder(None)
    result["base_largest_shard_mib"] = round(max((base / f).stat().st_size for f in read_checkpoint(base).shards) / 2**20, 1)

    prompts, conts, ref_logits, eos, texts = reference_generations(adapter, a.prompts, a.new_tokens)
    vocab = llama_cpp.Llama(str(work / "merged_f32.gguf"), n_ctx=512, verbose=False, vocab_only=True)
    result["llama_cpp_tokenizes_prompts_like_transformers"] = sum(
        vocab.tokenize(t.encode(), add_bos=True, special=True) == ids for t, ids in zip(texts, prompts))
    vocab.close()
    checks = {}
    for name, model, lora in (("merged_f32", "merged_f32", None), ("base_f32+adapter_f32", "base_f32", "adapter_f32"),
                              ("merged_f16", "merged_f16", None), ("base_f16+adapter_f16", "base_f16", "adapter_f16"),
                              ("merged_q8_0", "merged_q8_0", None), ("merged_Q4_K_M", "merged_Q4_K_M", None)):
        if exports[model]["rc"] != 0 or (lora and exports[lora]["rc"] != 0):
            continue
        c = llama_cpp_check(work / f"{model}.gguf", work / f"{lora}.gguf" if lora else None, prompts, conts, ref_logits,
                            eos, a.new_tokens)
        checks[name] = c
        print(f"{name}: {c['identical']}/{c['n']} identical, max |logit diff| {c['max_abs_logit_diff']}", flush=True)
    for x, y in (("merged_f32", "base_f32+adapter_f32"), ("merged_f16", "base_f16+adapter_f16")):
        if x in checks and y in checks:
            same = sum(p == q for p, q in zip(checks[x]["tokens"], checks[y]["tokens"]))
            checks[f"{y} vs {x}"] = {"identical": same, "n": len(prompts)}
    for c in checks.values():
        c.pop("tokens", None)
    result["llama_cpp_vs_lorakit"] = checks
    result["prompts"], result["new_tokens"] = len(prompts), a.new_tokens

    merged_folder = work / "merged_folder"
    r = run_measured(lorakit_cmd("merge", "--adapter", run, "--out", merged_folder, "--dtype", "fp32"), env=env)
    result["merge_folder"] = {k: r[k] for k in ("seconds", "peak_rss_anon_mib", "rc")}
    result["reference_converters"] = reference_converters(Path(a.ref), merged_folder, base, adapter, work)

    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gguf_check.md").write_text(markdown(result))
    print(f"wrote {out / 'gguf_check.json'} and {out / 'gguf_check.md'}")
    return 0


def markdown(r: dict) -> str:
    lines = ["# GGUF export checked by llama.cpp", "",
             f"`python bench/gguf_check.py` — llama-cpp-python {r['llama_cpp_python']}, {r['cpus']} CPUs; "
             f"embedded SmolLM2-135M-Instruct fine-tuned 5 steps; {r['prompts']} held-out prompts, "
             f"{r['new_tokens']} greedy tokens each; llama.cpp with an f32 KV cache.", "",
             "| llama.cpp ran | token-identical to lorakit | max abs logit diff (teacher-forced) |", "|---|---|---|"]
    for name, c in r["llama_cpp_vs_lorakit"].items():
        diff = c.get("max_abs_logit_diff", "")
        lines.append(f"| {name} | {c['identical']}/{c['n']} | {diff} |")
    lines += ["", "| `lorakit export` | wall s | CPU s | peak RssAnon MiB | size MB |", "|---|---|---|---|---|"]
    for name, e in r["exports"].items():
        lines.append(f"| {name} | {e['seconds']} | {e.get('cpu_seconds', '')} | {e['peak_rss_anon_mib']} | {e['mb']} |")
    lines += ["", f"llama.cpp's own tokenizer (from the GGUF metadata) gives the same token ids as transformers for "
                  f"{r['llama_cpp_tokenizes_prompts_like_transformers']}/{r['prompts']} prompt texts."]
    lines += ["", f"Importing torch + transformers + gguf alone: {r['import_only_peak_rss_anon_mib']} MiB RssAnon; "
                  f"the base checkpoint's largest shard: {r['base_largest_shard_mib']} MiB.", ""]
    ref = r.get("reference_converters", {})
    if "skipped" in ref:
        lines.append(f"Reference converters: skipped ({ref['skipped']}).")
    for key in ("merged_vs_reference", "adapter_vs_reference"):
        if key in ref:
            c = ref[key]
            lines += [f"## {key.replace('_', ' ')}", "",
                      f"- tensors: {c['tensor_count'][0]} (lorakit) vs {c['tensor_count'][1]} (reference); only lorakit: "
                      f"{c['tensors_only_lorakit'] or 'none'}; only reference: {c['tensors_only_reference'] or 'none'}; "
                      f"shape/type differences: {c['tensor_shape_or_type_differences'] or 'none'}; largest element "
                      f"difference of same-named tensors: {c['max_tensor_data_diff']:.3g}",
                      f"- metadata only in lorakit's: {c['metadata_only_lorakit'] or 'none'}",
                      f"- metadata only in the reference: {c['metadata_only_reference'] or 'none'}",
                      f"- metadata values that differ: {json.dumps(c['metadata_value_differences'], default=str) or 'none'}", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
