"""Compatibility shim: lorakit.checkpointing moved to lorakit.model.activation_checkpointing; import from there."""
from lorakit.model.activation_checkpointing import *  # noqa: F401,F403
