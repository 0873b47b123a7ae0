"""Backends: real libraries as variants, measured on the same tokens as our own formats.

    bnb            bitsandbytes' LLM.int8(), NF4 and FP4 linear layers (`bnb-int8`, `bnb-nf4`, `bnb-fp4`)
    gguf_export    any model quantbench loads (Llama family, GPT-2), written as a GGUF file
    llamacpp       llama.cpp through llama-cpp-python: quantize a GGUF and evaluate it (`llamacpp:type=...`)

The libraries are optional: every module here imports them only inside the functions that use
them, so the package imports and `quantbench list` works without them; a method whose library
is missing says so in `requires` and is reported skipped.
"""
