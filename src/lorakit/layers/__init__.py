"""One LoRA wrapper per base-layer kind; each holds its frozen base layer. registry.py lists the kinds."""
from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import LoraConv
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear, LoraMergedLinear, linear_shape
from lorakit.layers.modules_to_save import ModulesToSave

__all__ = ["LoraLayer", "LoraLinear", "LoraMergedLinear", "LoraEmbedding", "LoraConv", "ModulesToSave",
           "linear_shape"]
