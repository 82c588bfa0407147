"""64 requests over 3 adapters and the base, sent at once: all answered, each as if it were served alone."""
from __future__ import annotations

import threading

import httpx

import serve_helpers
from serve_helpers import adapter_root  # noqa: F401 (fixtures)

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock", "star"]


def requests_mix(n=64):
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 9))
        body = {"model": ("tiny", "a", "b", "c")[i % 4], "prompt": f"Say the first word. {words}",
                "max_tokens": 3 + (i * 5) % 17, "temperature": 0}
        if i % 8 == 5:  # a few seeded samplers: their own generator, so the batch does not matter either
            body.update(temperature=0.8, top_p=0.9, seed=i)
        out.append(body)
    return out


def test_64_concurrent_requests_equal_served_alone(adapter_root):
    live = serve_helpers.start({n: adapter_root / n for n in ("a", "b", "c")}, max_batch=32)
    try:
        bodies = requests_mix()
        with httpx.Client(timeout=120) as c:
            alone = [c.post(live.url + "/completions", json=b).json() for b in bodies]
        assert live.engine.peak_batch == 1
        results: list = [None] * len(bodies)
        start = threading.Barrier(len(bodies))

        def send(i):
            start.wait(30)
            with httpx.Client(timeout=120) as c:
                results[i] = c.post(live.url + "/completions", json=bodies[i]).json()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and "choices" in r for r in results), [r for r in results if not r or "error" in r]
        assert len({r["id"] for r in results}) == len(bodies)
        for body, a, r in zip(bodies, alone, results):
            assert r["choices"][0]["text"] == a["choices"][0]["text"], body
            assert r["usage"] == a["usage"] and r["model"] == body["model"]
        assert live.engine.peak_batch > 8  # they really were batched together
        stats = httpx.get(live.root + "/health", timeout=10).json()
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["served"] == 2 * len(bodies)
    finally:
        live.close()
