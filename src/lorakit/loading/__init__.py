"""Loading base models: a HF folder, a hub id, a GGUF file or the embedded default (pretrained.py); the
tokenizer of any of them without the weights (tokenizer.py: data is checked before the model loads)."""
