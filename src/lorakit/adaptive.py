"""Compatibility shim: lorakit.adaptive moved to lorakit.train.adaptive; import from there."""
from lorakit.train.adaptive import *  # noqa: F401,F403
