"""Compatibility shim: lorakit.models moved to lorakit.loading.pretrained; import from there."""
from lorakit.loading.pretrained import *  # noqa: F401,F403
