"""Backends that run dreamr's models somewhere other than in this process: :mod:`dreamr.backends.vllm`
(vLLM's OpenAI-compatible servers). The in-process backend (transformers models) is :mod:`dreamr.engines`."""
