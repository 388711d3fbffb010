"""Images in SAPO: rows with an ``image`` path, for a vision-language or a text-only draft.

Who sees a row's images:

* a vision-language draft (its config has a ``vision_config``; trained with its processor): its prompt is
  the system instruction and one user message, the images then the question, built by its processor;
  rollouts (``generate``) and the policy / reference log-probabilities run with the images' pixel values;
* a text-only draft: the question alone (it cannot see the image), as for a text row;
* a vision-language target (given with its processor): its CPN verification of every drafted step reads
  the images with the prompt (``training.scoring.StepScorer.score(images=...)``), so the draft reward judges
  steps against the picture even where the draft wrote them blind.

With two text-only models a row's images are ignored (:attr:`VisionData.unseen_image_rows` counts those rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from dreamr.lm import is_vision_language
from dreamr.multimodal import load_image, prepare_prompt, processor_inputs

__all__ = ["VisionData"]


class VisionData:
    """The trainer's image handling: which model sees a row's images, their loading and model inputs.

    Parameters
    ----------
    dataset : training.data.Dataset
    draft : the policy; draft_processor : its processor (None for a text-only draft).
    target : the judge or None; target_processor : its processor (None for a text-only target).
    """

    def __init__(self, dataset, draft, draft_processor, target, target_processor):
        self.draft_sees = is_vision_language(draft)
        self.target_sees = target is not None and is_vision_language(target)
        for role, sees, proc in (("draft", self.draft_sees, draft_processor),
                                 ("target", self.target_sees, target_processor)):
            if sees and proc is None and dataset.image_rows:
                raise ValueError(f"{role}_tokenizer: the {role} is a vision-language model but was given a tokenizer, "
                                 f"not its processor; pass {role}_tokenizer=AutoProcessor.from_pretrained(...) so that "
                                 "it can read the rows' images")
        self.draft_processor = draft_processor
        # rows whose images no model sees (both text-only): they train on their question alone
        self.unseen_image_rows = 0 if (self.draft_sees or self.target_sees) else dataset.image_rows
        if self.draft_sees or self.target_sees:  # every image file exists before any training
            for i, ex in enumerate(dataset.examples):
                for path in ex.images:
                    if not Path(path).is_file():
                        raise ValueError(f"{dataset.source}: row {i + 1}: image={path!r} is not a file; give the path "
                                         "of a readable image (relative paths start at the JSONL file's folder)")

    def images(self, example, index: Optional[int] = None) -> list:
        """The example's images as RGB PIL images (ValueError names the file if one cannot be read)."""
        where = "image" if index is None else f"row {index + 1}: image"
        return [load_image(p, where) for p in example.images]

    def target_images(self, example, images: Optional[list] = None) -> Optional[list]:
        """What the target's verification sees: the images (``images`` if already read), or None where it
        cannot see them."""
        if not (self.target_sees and example.images):
            return None
        return images if images is not None else self.images(example)

    def draft_inputs(self, example, messages: list[dict], images: Optional[list] = None) -> Optional[dict]:
        """A vision-language draft's processor inputs for an image row (``input_ids [1, P]``,
        ``pixel_values``, ...; from ``images`` if already read), or None where the draft reads text only."""
        if not (self.draft_sees and example.images):
            return None
        images = images if images is not None else self.images(example)
        mm = prepare_prompt(messages, images, name="question", images_name="image")
        return processor_inputs(self.draft_processor, mm, "draft", name="question")

    def row_inputs(self, example, messages: list[dict]) -> tuple[Optional[dict], Optional[list]]:
        """``(draft_inputs, target_images)`` of a row, its image files read once for both."""
        images = self.images(example) if example.images and (self.draft_sees or self.target_sees) else None
        return self.draft_inputs(example, messages, images), self.target_images(example, images)

    @staticmethod
    def generate_kwargs(inputs: Optional[dict], rows: int, device) -> dict:
        """Extra ``generate`` inputs for ``rows`` copies of one image prompt (pixel values repeated)."""
        if inputs is None:
            return {}
        return _per_row_inputs([(inputs, rows)], int(inputs["input_ids"].shape[1]), device)

    @staticmethod
    def batch_kwargs(groups: Sequence[tuple[Optional[dict], int, int]], width: int, device) -> dict:
        """Extra forward inputs of a padded batch: ``groups`` lists, in row order, ``(inputs, rows,
        prompt_len)`` per rollout (inputs None for a text prompt). Per-token inputs (``[1, P]``:
        ``mm_token_type_ids``, ``token_type_ids``, ...) are padded with zeros to ``width``, all-zero rows
        for the text prompts; per-image inputs (``pixel_values``,
        ``image_grid_thw``) are concatenated, repeated for each row of the group."""
        if all(inputs is None for inputs, _, _ in groups):
            return {}
        return _per_row_inputs([(inputs, rows) for inputs, rows, _ in groups], width, device)


def _per_row_inputs(groups, width: int, device) -> dict:
    """Per-token inputs get one row per batch row (zeros for a group without inputs, a text prompt);
    per-image inputs are concatenated over the groups that have them."""
    per_token: dict[str, list[torch.Tensor]] = {}
    per_image: dict[str, list[torch.Tensor]] = {}
    keys = sorted({k for inputs, _ in groups if inputs is not None for k in inputs} - {"input_ids", "attention_mask"})
    # a key is per-token when it is [1, P_g] in the groups that have it (mm_token_type_ids, token_type_ids)
    token_dtype: dict[str, torch.dtype] = {}
    for inputs, _ in groups:
        if inputs is None:
            continue
        P = int(inputs["input_ids"].shape[1])
        for k in keys:
            v = inputs.get(k)
            if isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (1, P):
                token_dtype.setdefault(k, v.dtype)
    if "mm_token_type_ids" in keys:
        token_dtype.setdefault("mm_token_type_ids", torch.long)
    for inputs, rows in groups:
        P = int(inputs["input_ids"].shape[1]) if inputs is not None else 0
        for k in keys:
            v = None if inputs is None else inputs.get(k)
            if k in token_dtype:
                row = torch.zeros(1, width, dtype=token_dtype[k])
                if isinstance(v, torch.Tensor):
                    row[:, :P] = v
                per_token.setdefault(k, []).extend([row] * rows)
            elif isinstance(v, torch.Tensor):
                per_image.setdefault(k, []).extend([v] * rows)
    out = {k: torch.cat(v, dim=0).to(device) for k, v in per_token.items()}
    out.update({k: torch.cat(v, dim=0).to(device) for k, v in per_image.items()})
    return out
