"""Compatibility shim: lorakit.gptq moved to lorakit.ops.gptq; import from there."""
from lorakit.ops.gptq import *  # noqa: F401,F403
