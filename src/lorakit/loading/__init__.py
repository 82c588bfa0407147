"""Loading base models: a HF folder, a hub id, a GGUF file or the embedded default (pretrained.py)."""
