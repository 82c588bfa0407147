"""OpenAI-compatible serving of a base model with many LoRA adapters at once (`lorakit serve`).

    engine.Engine        continuous batching over mixed-adapter rows with a KV cache, on one thread
    app.create_app       the FastAPI app (OpenAI routes, vLLM's adapter routes)
    launch.build_app     model + adapters + engine + app from ServeOptions; launch.run_server runs uvicorn
"""
from lorakit.serve.adapters import AdapterPool
from lorakit.serve.engine import Engine, Request
from lorakit.serve.sampling import SamplingParams

__all__ = ["AdapterPool", "Engine", "Request", "SamplingParams"]
