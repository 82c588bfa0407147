"""Operations on a whole model: targets, inject, merge, adapters, mixed batches, quantize, memory, compile, checkpointing."""
