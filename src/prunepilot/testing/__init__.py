"""Models, files and servers made in-process for the tests and the bench scripts (imported by neither the library
nor the CLI; importing this package imports nothing):

    tiny_models    tiny randomly initialised models of each supported architecture, a byte-level toy tokenizer
    hostile_files  damaged GGUF and safetensors model files for the guarded reader
    llama_server   llama-cpp-python's OpenAI-compatible server on 127.0.0.1, bounded start, cannot outlive its parent
"""
