"""dreamr.models.load on a saved vision-language model folder: Auto classes and its processor."""

from __future__ import annotations

from dreamr import models
from dreamr.reasoner import SpeculativeReasoner
from vlm_models import qwen2_vl, random_image


def test_load_a_vision_language_folder_with_its_processor(tmp_path):
    model, processor = qwen2_vl(seed=0, layers=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = models.load(tmp_path)
    assert type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Qwen2VLProcessor" and loaded.tokenizer is loaded.processor.tokenizer
    kw = dict(max_step_tokens=4, max_new_tokens=8, mode="target")
    from_folder = SpeculativeReasoner.from_pretrained(target=str(tmp_path), draft=str(tmp_path), **kw)
    in_memory = SpeculativeReasoner(model, model, target_tokenizer=processor, draft_tokenizer=processor, **kw)
    image = random_image(3)
    assert from_folder.generate("How many?", images=[image]).text == in_memory.generate("How many?", images=[image]).text
