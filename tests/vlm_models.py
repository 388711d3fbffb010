"""The tiny vision-language models live in :mod:`dreamr.testing` (benchmarks use them too); this keeps
``from vlm_models import ...`` working in the tests that write it."""

from dreamr.testing import bpe_tokenizer, llava, qwen2_5_vl, qwen2_vl, random_image, vision_module  # noqa: F401
