"""Loading base models: the streaming loader (tensor by tensor, quantized as it reads) and the memory plan."""
from lorakit.loading.checkpoint_files import CheckpointFiles, open_checkpoint
from lorakit.loading.streaming import load_pretrained_streaming, stream_folder

__all__ = ["CheckpointFiles", "open_checkpoint", "load_pretrained_streaming", "stream_folder"]
