"""Deploying a trained adapter: merged safetensors written shard by shard, GGUF files for llama.cpp and Ollama.

    sources.py        where the base checkpoint's files and the adapter folder are (run/checkpoint/adapter)
    deltas.py         the adapter as per-tensor updates (LoRA, DoRA, embeddings, replaced modules)
    sharded_merge.py  base + adapter -> a safetensors folder in the base's sharding, one tensor in memory at a time
    gguf_arch.py      per-architecture GGUF metadata and tensor conventions (names, Q/K permutation, norms)
    gguf_vocab.py     the tokenizer as GGUF metadata (bpe_pre.py: llama.cpp's pre-tokenizer names by hash)
    gguf.py           merged model / adapter-only GGUF files
    llama_cpp.py      llama.cpp's own quantizer through llama-cpp-python (optional)
    ollama.py         an Ollama Modelfile with the chat template translated
    output.py         single-file outputs: refuse folders/existing files, check disk, write atomically
    pipeline.py       `lorakit export` end to end (checks first, then the files, then the Modelfile)
"""
