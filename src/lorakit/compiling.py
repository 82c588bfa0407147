"""Compatibility shim: lorakit.compiling moved to lorakit.model.compiling; import from there."""
from lorakit.model.compiling import *  # noqa: F401,F403
