"""`lorakit serve` as a process: starts from the CLI, and SIGTERM finishes the request in flight, then exits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

import serve_helpers
from serve_helpers import adapter_root  # noqa: F401 (fixtures)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_sigterm_finishes_in_flight_request_then_exits(adapter_root, tmp_path):
    from train_fixtures import write_tiny_model

    folder = write_tiny_model(tmp_path / "model")
    port = serve_helpers.free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(folder), "--port", str(port),
                             "--adapter", f"a={adapter_root / 'a'}", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]] == ["model", "a"]
        body = {"model": "a", "prompt": "red cat", "max_tokens": 400, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-2]][-1]
        assert finish == "stop" or usage["completion_tokens"] == 400
        assert proc.wait(60) == 128 + signal.SIGTERM  # as `lorakit train` exits on SIGTERM
        assert "stopped by SIGTERM" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
