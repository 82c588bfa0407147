"""Compatibility shim: lorakit.quant moved to lorakit.ops.nf4, lorakit.model.quantize, lorakit.model.merge, lorakit.model.memory; import from there."""
from lorakit.ops.nf4 import *  # noqa: F401,F403
from lorakit.model.quantize import *  # noqa: F401,F403
from lorakit.model.merge import *  # noqa: F401,F403
from lorakit.model.memory import *  # noqa: F401,F403
