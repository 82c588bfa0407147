"""Compatibility shim: lorakit.rank moved to lorakit.analysis.spectrum; import from there."""
from lorakit.analysis.spectrum import *  # noqa: F401,F403
