"""Compatibility shim: lorakit.adapters moved to lorakit.model.state, lorakit.model.adapters, lorakit.model.mixed_batch; import from there."""
from lorakit.model.state import *  # noqa: F401,F403
from lorakit.model.adapters import *  # noqa: F401,F403
from lorakit.model.mixed_batch import *  # noqa: F401,F403
