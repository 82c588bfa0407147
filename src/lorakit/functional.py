"""Compatibility shim: lorakit.functional moved to lorakit.ops.lora, lorakit.ops.cross_entropy; import from there."""
from lorakit.ops.lora import *  # noqa: F401,F403
from lorakit.ops.cross_entropy import *  # noqa: F401,F403
