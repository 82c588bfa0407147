"""Serving throughput and latency: lorakit serve vs answering one request at a time with model.generate.

    scenario   what the server holds                    what the requests name
    single     base + 4 adapters (unmerged)             all adapter a0
    mixed      base + 4 adapters (unmerged)             a0, a1, a2, a3 in turn (rows of one batch differ)
    merged     a0 folded into the base (no LoRA left)   the base
    generate   no server: model.generate(greedy), one request after another, a0 active (what users write)

Each server scenario runs at concurrency 1, 8 and 32 over HTTP (closed loop: every client thread sends its
next request when the last one returns). tokens/s = completion tokens / wall time; latency = one request's
round trip; tokens per CPU-second = completion tokens / the server's CPU time (this process's CPU time minus
that of the client threads; for generate, the CPU time of the generate calls): on a machine shared with other
work, wall time measures the neighbours too, CPU time does not. The generate baseline serves the same requests one at a time; its latency at concurrency c is
what c clients waiting on that one-at-a-time loop would see (queueing on the measured service times).
Every run checks that each request got exactly one answer (none lost or duplicated), and that each greedy
answer at concurrency 8 and 32 equals the same request's answer at concurrency 1.

    python bench/serve.py --small                              # tiny random model, seconds (a smoke check)
    python bench/serve.py --out bench/results/serve.json       # the embedded SmolLM2-135M (a few minutes)

Targets (issue 19): mixed >= 0.8 x single at c=8; batched (single) >= 3 x generate at c=8.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "serve"))

CONCURRENCY = (1, 8, 32)
ADAPTERS = ("a0", "a1", "a2", "a3")
TOPICS = ["the sea", "a small robot", "winter in a city", "an old library", "a lost key", "the first day of school",
          "a mountain village", "a rainy afternoon", "a friendly dragon", "a long train ride", "a garden at night",
          "a broken clock", "a market in the morning", "a ship in a storm", "a quiet forest", "a new neighbour"]
TARGETS = {"mixed_over_single_c8": 0.8, "batched_over_generate_c8": 3.0,
           "cpu_mixed_over_single_c8": 0.8, "cpu_batched_over_generate_c8": 3.0}


def load(small: bool):
    if small:
        import serve_helpers
        tok = serve_helpers.tokenizer()
        return serve_helpers.model(tok), tok, "tiny random Llama (hidden 32, 2 layers)"
    from lorakit.loading.pretrained import load_model
    model, tok = load_model(None)
    return model, tok, "SmolLM2-135M-Instruct (embedded, fp32)"


def make_adapters(model, folder: Path) -> dict[str, Path]:
    """Saves 4 rank-8 adapters on q/k/v/o with random non-zero B (distinct answers, still fluent text)."""
    import lorakit
    out = {}
    for i, name in enumerate(ADAPTERS):
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]), adapter_name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out[name] = lorakit.save_adapter(model, folder / name, adapter_name=name)
        lorakit.delete_adapter(model, name)
    return out


def bodies(tok, n: int, models: list[str], max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]
        out.append({"model": models[i % len(models)], "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0})
    return out


def run_load(url: str, jobs: list[dict], concurrency: int) -> dict:
    """Sends `jobs` with `concurrency` client threads; returns throughput, latencies and answers by job index."""
    import httpx
    answers: dict[int, list] = {i: [] for i in range(len(jobs))}
    latencies, errors, client_cpu = [], [], []
    lock = threading.Lock()
    todo = list(range(len(jobs)))

    def client():
        cpu0 = time.thread_time()
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if not todo:
                        client_cpu.append(time.thread_time() - cpu0)
                        return
                    i = todo.pop(0)
                t0 = time.perf_counter()
                r = c.post(url + "/chat/completions", json=jobs[i])
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    answers[i].append(r.json())
                    latencies.append(dt)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 - sum(client_cpu)  # the server's share: uvicorn, handlers and the engine
    tokens = sum(a["usage"]["completion_tokens"] for v in answers.values() for a in v)
    ids = [a["id"] for v in answers.values() for a in v]
    return {"concurrency": concurrency, "requests": len(jobs), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "cpu_s": round(cpu, 3),
            "tokens_per_cpu_s": round(tokens / cpu, 2), "p50_s": round(_pct(latencies, 50), 3),
            "p95_s": round(_pct(latencies, 95), 3), "lost": sum(1 for v in answers.values() if not v),
            "duplicated": sum(max(0, len(v) - 1) for v in answers.values()) + len(ids) - len(set(ids)),
            "errors": errors[:3], "_texts": {i: v[0]["choices"][0]["message"]["content"] for i, v in answers.items() if v}}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def serve_scenarios(model, tok, adapters, scenarios, n_for, max_tokens, max_batch) -> dict:
    import serve_helpers
    from lorakit.serve.app import create_app
    from lorakit.serve.launch import build_engine

    engine = build_engine(model, tok, [(n, str(p)) for n, p in adapters.items()], max_batch=max_batch)
    live = serve_helpers.LiveServer(create_app(engine, base_name="base"), engine)
    out = {}
    try:
        for name, models in scenarios.items():
            out[name] = {}
            for c in CONCURRENCY:
                jobs = bodies(tok, n_for(c), models, max_tokens)
                res = run_load(live.url, jobs, c)
                out[name][c] = res
                print(f"  {name:8s} c={c:<3d} {res['tokens_per_s']:8.1f} tok/s  p50 {res['p50_s']:.2f}s  "
                      f"p95 {res['p95_s']:.2f}s  lost {res['lost']} dup {res['duplicated']}", flush=True)
            _check_same_answers(out[name])
    finally:
        live.close()
        engine.stop(60)
    return out


def _check_same_answers(runs: dict) -> None:
    """Greedy answers must not depend on concurrency: compare every request with the c=1 answer."""
    base = runs[1]["_texts"]
    for c, res in runs.items():
        shared = [i for i in res["_texts"] if i in base]
        res["same_as_c1"] = sum(res["_texts"][i] == base[i] for i in shared)
        res["compared"] = len(shared)
    for res in runs.values():
        res.pop("_texts")


def generate_baseline(model, tok, adapter_dir: Path, n: int, max_tokens: int) -> dict:
    """model.generate on one request at a time (adapter a0 active); queueing latencies for each concurrency."""
    import lorakit
    lorakit.load_adapter(model, adapter_dir, adapter_name="a0")
    lorakit.set_adapter(model, "a0")
    service, tokens, cpu = [], 0, 0.0
    for job in bodies(tok, n, ["a0"], max_tokens):
        text = tok.apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        t0, cpu0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        service.append(time.perf_counter() - t0)
        cpu += time.process_time() - cpu0
        new = out[0, ids.shape[1]:].tolist()
        tokens += len(new)
    total = sum(service)
    result = {}
    for c in CONCURRENCY:
        # c closed-loop clients on a one-at-a-time server: request k waits for the ones before it
        free_at, lat = [0.0] * c, []
        clock = 0.0
        for k, s in enumerate(service):
            start = max(clock, min(free_at))
            slot = free_at.index(min(free_at))
            clock = start + s
            lat.append(clock - free_at[slot])
            free_at[slot] = clock
        result[c] = {"concurrency": c, "requests": n, "tokens": tokens, "wall_s": round(total, 3),
                     "tokens_per_s": round(tokens / total, 2), "cpu_s": round(cpu, 3),
                     "tokens_per_cpu_s": round(tokens / cpu, 2), "p50_s": round(_pct(lat, 50), 3),
                     "p95_s": round(_pct(lat, 95), 3), "lost": 0, "duplicated": 0}
        print(f"  generate c={c:<3d} {result[c]['tokens_per_s']:8.1f} tok/s  p50 {result[c]['p50_s']:.2f}s  "
              f"p95 {result[c]['p95_s']:.2f}s", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny random model (a quick smoke run)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="requests per client thread (at least 8 per run)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 with --small, else torch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import lorakit

    if args.threads or args.small:
        torch.set_num_threads(args.threads or 1)
    n_for = lambda c: max(8, c * args.requests)  # noqa: E731
    model, tok, desc = load(args.small)
    t_start = time.time()
    load_before = os.getloadavg()
    print(f"model: {desc}; torch threads {torch.get_num_threads()}; load average {load_before}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model, Path(tmp))
        results = serve_scenarios(model, tok, adapters,
                                  {"single": ["a0"], "mixed": list(ADAPTERS)}, n_for, args.max_tokens, args.max_batch)
        merged_src, _, _ = load(args.small)
        lorakit.load_adapter(merged_src, adapters["a0"], adapter_name="a0")
        merged = lorakit.merge_and_unload(merged_src)
        results.update(serve_scenarios(merged, tok, {}, {"merged": ["base"]}, n_for, args.max_tokens, args.max_batch))
        del merged, merged_src
        base_model, _, _ = load(args.small)
        results["generate"] = generate_baseline(base_model, tok, adapters["a0"], n_for(8), args.max_tokens)

    def ratio(a, b, key="tokens_per_s"):
        return results[a][8][key] / results[b][8][key]
    ratios = {"mixed_over_single_c8": ratio("mixed", "single"),
              "batched_over_generate_c8": ratio("single", "generate"),
              "merged_over_single_c8": ratio("merged", "single"),
              # per CPU-second of the process: the same comparison with other processes' load factored out
              "cpu_mixed_over_single_c8": ratio("mixed", "single", "tokens_per_cpu_s"),
              "cpu_batched_over_generate_c8": ratio("single", "generate", "tokens_per_cpu_s")}
    lost = sum(r["lost"] + r["duplicated"] for s in results.values() for r in s.values())
    print(f"\n{'scenario':10s}" + "".join(f"{'c=' + str(c) + ' tok/s':>14s}{'tok/cpu-s':>10s}{'p50':>8s}{'p95':>8s}"
                                          for c in CONCURRENCY))
    for name, runs in results.items():
        print(f"{name:10s}" + "".join(f"{runs[c]['tokens_per_s']:14.1f}{runs[c]['tokens_per_cpu_s']:10.1f}"
                                      f"{runs[c]['p50_s']:8.2f}{runs[c]['p95_s']:8.2f}" for c in CONCURRENCY))
    for key, value in ratios.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else (f"  target >= {target}: " + ("met" if value >= target else "MISSED"))
        print(f"{key:28s} {value:6.2f}x{verdict}")
    print(f"lost or duplicated requests: {lost}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": desc, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "note": "shared CPU: other processes ran during the measurement"},
        "results": {k: {str(c): r for c, r in v.items()} for k, v in results.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets": TARGETS,
        "lost_or_duplicated": lost, "wall_s": round(time.time() - t_start, 1),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
