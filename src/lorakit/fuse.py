"""Compatibility shim: lorakit.fuse moved to lorakit.model.shared_input; import from there."""
from lorakit.model.shared_input import *  # noqa: F401,F403
