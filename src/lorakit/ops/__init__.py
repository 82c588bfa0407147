"""Leaf math: the fused LoRA autograd functions, the chunked loss head, NF4 weights and GPTQ (torch + errors only)."""
