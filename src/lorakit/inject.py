"""Compatibility shim: lorakit.inject moved to lorakit.model.state, lorakit.model.targets, lorakit.model.inject, lorakit.model.summary, lorakit.model.merge, lorakit.layers.registry; import from there."""
from lorakit.model.state import *  # noqa: F401,F403
from lorakit.model.targets import *  # noqa: F401,F403
from lorakit.model.inject import *  # noqa: F401,F403
from lorakit.model.summary import *  # noqa: F401,F403
from lorakit.model.merge import *  # noqa: F401,F403
from lorakit.layers.registry import *  # noqa: F401,F403
