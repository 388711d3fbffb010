"""Images for vision-language models: loading and checking them, and each model's inputs from its own
processor. Nothing here runs a model: the image prefix those inputs give (the KV cache of a prompt with
images, encoded once per model per request) is :func:`dreamr.cache.encode_prefix`.

A request with images becomes, for each model:

* a vision-language model (its config has a ``vision_config``; its processor was given): the
  processor's inputs (:func:`processor_inputs`), ``input_ids [1, P]`` with the image placeholders
  expanded plus ``pixel_values`` (and ``image_grid_thw`` / ``mm_token_type_ids`` for Qwen2-VL, ...). The
  engine encodes them once into an image prefix (:class:`dreamr.cache.ImagePrefix`), and every later
  forward feeds text tokens only on top of that cache;
* a text-only model (a draft beside a vision-language target, or a target beside a vision-language
  draft): the prompt without its image parts. The draft writes from the text alone; the target, which
  sees the image, verifies its steps and writes the ones it rejects. A mode must run at least one model
  that sees the images (mode "draft" with a text-only draft, or "target" with a text-only target, raises).

A prompt given as a string with images becomes one user message: the images, then the text; it goes
through each model's chat template (the processor's for a vision-language model, the tokenizer's, if it
has one, for a text-only draft). Chat messages may hold image parts (``{"type": "image"}``, with the image
itself under ``"image"``, ``"path"`` or ``"url"`` (a local path), or filled in order from ``images=``).

This module imports no other part of dreamr (see ``docs/architecture.md``, layer "model facts and text").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

__all__ = [
    "ImageLike",
    "MultimodalPrompt",
    "load_image",
    "load_images",
    "prepare_prompt",
    "processor_inputs",
    "text_of",
]

ImageLike = Union["PIL.Image.Image", str, os.PathLike, torch.Tensor]  # noqa: F821

_IMAGE_SOURCE_KEYS = ("image", "path", "url")


# -- images ------------------------------------------------------------------------------------------


def load_image(image: Any, name: str = "images[0]"):
    """One image as an RGB ``PIL.Image.Image``.

    Parameters
    ----------
    image : PIL.Image.Image, str, os.PathLike or torch.Tensor
        A PIL image; the path of an image file; or a tensor ``[C, H, W]`` (C = 1, 3 or 4) or ``[H, W]``,
        uint8 in [0, 255] or floating point in [0, 1].
    name : str
        How the caller names the argument, for the error message.

    Raises
    ------
    ValueError
        An unsupported type, a path that is not a readable image file, or a tensor of a bad shape,
        dtype or range.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ValueError(f"{name}={str(image)!r}: no such image file; give the path of a readable image file "
                             "(or a PIL image, or a tensor [C, H, W])")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"{name}={str(image)!r}: the file cannot be read as an image ({exc}); give a PNG, "
                             "JPEG or other file PIL can open") from None
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] not in (1, 3, 4) or t.shape[1] < 1 or t.shape[2] < 1:
            raise ValueError(f"{name}: an image tensor must be [C, H, W] with C in (1, 3, 4), or [H, W]; got shape "
                             f"{tuple(image.shape)} (give a list of images, one tensor each)")
        if t.dtype == torch.uint8:
            pass
        elif t.is_floating_point():
            if not bool(torch.isfinite(t).all()) or float(t.min()) < 0.0 or float(t.max()) > 1.0:
                raise ValueError(f"{name}: a floating-point image tensor must hold finite values in [0, 1]; got "
                                 f"values in [{float(t.min())}, {float(t.max())}] (scale it, or pass uint8)")
            t = (t.float() * 255.0).round().to(torch.uint8)
        else:
            raise ValueError(f"{name}: an image tensor must be uint8 or floating point, got {image.dtype}")
        array = t.permute(1, 2, 0).numpy()
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[t.shape[0]]
        return Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode).convert("RGB")
    raise ValueError(f"{name}: unsupported image type {type(image).__name__}; give a PIL image, the path of an "
                     "image file, or a tensor [C, H, W]")


def _is_single_image(images: Any) -> bool:
    from PIL import Image

    return isinstance(images, (Image.Image, str, os.PathLike, torch.Tensor))


def load_images(images: Any, name: str = "images") -> list:
    """``images`` (None, one image, or a sequence of images) as a list of RGB PIL images."""
    if images is None:
        return []
    if _is_single_image(images):
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return [load_image(t, f"{name}[{i}]") for i, t in enumerate(images)]
        return [load_image(images, name)]
    if not isinstance(images, Sequence) or isinstance(images, (bytes, bytearray)):
        raise ValueError(f"{name}: expected an image or a list of images (PIL images, paths or tensors), got "
                         f"{type(images).__name__}")
    return [load_image(img, f"{name}[{i}]") for i, img in enumerate(images)]


# -- prompts -----------------------------------------------------------------------------------------


@dataclass
class MultimodalPrompt:
    """A prompt with images, in the two forms the models take.

    Attributes
    ----------
    messages : list of dict
        Chat messages whose image parts are bare ``{"type": "image"}`` (for a processor's chat template).
    images : list of PIL.Image.Image
        The images in the order of the image parts.
    text_messages : list of dict
        The same messages with the image parts dropped and each content a string (for a text-only model).
    """

    messages: list[dict]
    images: list
    text_messages: list[dict]


def text_of(content) -> str:
    """A message content as a string: itself, or its text parts joined (image parts dropped)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str))


def prepare_prompt(prompt: Union[str, Sequence[dict]], images: Any, name: str = "prompt",
                   images_name: str = "images") -> Optional[MultimodalPrompt]:
    """Gather a prompt's images (from ``images`` and from image parts of its messages).

    Returns None when the request has no image at all (the text path is unchanged). ``images`` fill, in
    order, the image parts that carry no image of their own; a string prompt becomes one user message
    with an image part per image, then the text.

    Raises
    ------
    ValueError
        More images than image parts without an image, an image part left without an image, a part
        of an unknown type, or an image that cannot be loaded.
    """
    given = load_images(images, images_name)
    if isinstance(prompt, str):
        if not given:
            return None
        messages = [{"role": "user", "content": [{"type": "image"} for _ in given] + [{"type": "text", "text": prompt}]}]
        return MultimodalPrompt(messages, given, [{"role": "user", "content": prompt}])
    out, text_out, found, places = [], [], [], 0
    for i, msg in enumerate(prompt):
        content = msg["content"]
        if isinstance(content, str):
            out.append(dict(msg))
            text_out.append(dict(msg))
            continue
        if not isinstance(content, Sequence):
            raise ValueError(f"{name}[{i}]['content'] must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            where = f"{name}[{i}]['content'][{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{where}: a text part needs a string 'text', got {part!r}")
                parts.append({"type": "text", "text": text})
            elif kind == "image":
                source = next((part[k] for k in _IMAGE_SOURCE_KEYS if part.get(k) is not None), None)
                if source is not None:
                    found.append(load_image(source, where))
                elif places < len(given):
                    found.append(given[places])
                    places += 1
                else:
                    raise ValueError(f"{where} is an image part with no image, and {images_name} holds {len(given)} "
                                     f"image(s) for the parts without one; pass one image per such part")
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{where}: parts must be {{'type': 'text', 'text': ...}} or {{'type': 'image', ...}}, "
                                 f"got {part!r}")
        out.append({**msg, "content": parts})
        text_out.append({**msg, "content": text_of(content)})
    if places < len(given):
        raise ValueError(f"{images_name}: {len(given)} image(s) given but the {name}'s messages have "
                         f"{places} image part(s) without an image to put them in; add one {{'type': 'image'}} "
                         "part per image to the messages (or pass the prompt as a string)")
    if not found:
        return None
    return MultimodalPrompt(out, found, text_out)


def processor_inputs(processor, mm: MultimodalPrompt, role: str, name: str = "prompt") -> dict:
    """The processor's model inputs for ``mm``: ``input_ids [1, P]``, ``pixel_values`` and the rest.

    Raises ValueError where the processor has no chat template, where the prompt text holds image
    placeholders of its own, or where the prompt would end with an image token (the last prompt token is
    fed later, as text). ``name`` is how the caller names the prompt, for the error messages.
    """
    template = getattr(processor, "chat_template", None)
    if not template:
        raise ValueError(f"{role}_tokenizer: the {role} processor ({type(processor).__name__}) has no chat template, "
                         "which places the images in the prompt; set processor.chat_template")
    text = processor.apply_chat_template(mm.messages, tokenize=False, add_generation_prompt=True)
    token = getattr(processor, "image_token", None)
    if isinstance(token, str) and token and text.count(token) != len(mm.images):
        raise ValueError(f"{name}: the {role} processor's chat template gives {text.count(token)} image place(s) "
                         f"({token!r}) for {len(mm.images)} image(s); do not write {token!r} in the prompt text: "
                         "pass the images with images= or as {'type': 'image'} parts of the messages")
    inputs = processor(text=[text], images=mm.images, return_tensors="pt")
    ids = inputs["input_ids"]
    image_token_id = getattr(processor, "image_token_id", None)
    if ids.shape[1] < 2 or (image_token_id is not None and int(ids[0, -1]) == int(image_token_id)):
        raise ValueError(f"{name}: for the {role} model the prompt ends with an image; a vision-language prompt "
                         "must end with text (use a chat template with a generation prompt, or add text after the image)")
    return dict(inputs)
