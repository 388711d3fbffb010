"""A model behind a vLLM server: its client, its local tokenizer, and the facts dreamr reads about it, in one place.

The remote counterpart of :class:`dreamr.lm.LM`: prompts are encoded here (the same
:func:`dreamr.lm.encode_prompt`), sent as token ids, and the tokens that come back are decoded here. The
tokenizer is checked against the server's ``/tokenize`` when the model is opened, so the ids mean the
same on both sides.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

from dreamr.backends.vllm.client import ServerClient, ServerInfo
from dreamr.lm import Prompt, encode_prompt, eos_ids, split_processor
from dreamr.steps import StepWriter

__all__ = ["Observer", "RemoteModel", "RemoteSequence", "load_tokenizer"]

# Debug hook of the remote engines: called as observer(target_ids, draft_ids) after each committed step, with
# each model's committed token ids (None for a model the mode does not run). Tests hold verdicts to them.
Observer = Callable[[Optional[list], Optional[list]], None]


def load_tokenizer(source: Any, info: ServerInfo, arg: str):
    """The local tokenizer of a served model.

    ``source``: a tokenizer (or a processor holding one); a dreamr built-in name, a folder or a Hugging Face
    id (read with ``AutoTokenizer``); or None: the server's model folder where it is on this machine
    (``/v1/models``' ``root``), else its served name as an id. Raises ValueError naming ``arg``."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        _, tok = split_processor(source)
        if not (callable(getattr(tok, "encode", None)) and callable(getattr(tok, "decode", None))):
            raise ValueError(f"{arg}: expected a tokenizer, a folder or a model id, got {type(source).__name__}")
        return tok
    from transformers import AutoTokenizer

    from dreamr import models

    if source is None:
        source = info.root if info.root and Path(info.root).is_dir() else info.served_name
    where = str(source)
    if where in models.BUILTIN_MODELS:
        folder = models.converted_path(where)
        if not (folder / "tokenizer_config.json").exists():
            models.load(where, progress=False)  # converts the built-in model once, tokenizer included
        where = str(folder)
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{arg}: no tokenizer could be read from {where!r} ({exc}); pass {arg}= the served "
                         "model's tokenizer, its folder or its Hugging Face id") from None


def _generation_eos(root: Optional[str]) -> tuple[Any, Any]:
    """(generation config, model config) of a local model folder, for its EOS ids; (None, None) elsewhere."""
    if not root or not Path(root).is_dir():
        return None, None
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(root)
    except (OSError, ValueError):
        gen = None
    try:
        cfg = AutoConfig.from_pretrained(root)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    except (OSError, ValueError):
        cfg = None
    return gen, cfg


class RemoteModel:
    """A served model and what the remote engines need to know about it.

    Parameters
    ----------
    client : ServerClient
        Its server (checked: :meth:`ServerClient.check`, :meth:`ServerClient.check_tokenizer`).
    tokenizer : see :func:`load_tokenizer`
    name : str
        Its role ("target", "draft"), for messages.

    Attributes
    ----------
    context_length : int, the server's ``max_model_len`` less one (vLLM refuses a prompt that leaves no room
        for the token it generates: a verdict's prompt must be shorter than ``max_model_len``)
    eos_ids : set of int, the tokens that end a step and the request (the tokenizer's and the model folder's)
    served_name : str, the model name requests give
    vision : False (the remote backend sends text prompts only)
    """

    vision = False
    processor = None

    def __init__(self, client: ServerClient, tokenizer: Any = None, name: str = "target"):
        info = client.check()
        self.client, self.name = client, name
        self.served_name, self.context_length = info.served_name, info.max_model_len - 1
        self.tokenizer = load_tokenizer(tokenizer, info, f"{name}_tokenizer")
        client.check_tokenizer(self.tokenizer, f"{name}_tokenizer")
        gen, cfg = _generation_eos(info.root)
        self.eos_ids: set[int] = eos_ids(SimpleNamespace(generation_config=gen), self.tokenizer, config=cfg)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (:func:`dreamr.lm.encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, self.name)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def step_ids(self, writer: StepWriter, same_tokenizer: bool) -> list[int]:
        """A step the other model wrote, in this model's tokens (as :meth:`dreamr.lm.LM.step_ids`)."""
        return writer.content_ids if same_tokenizer else self.encode_text(writer.text)


class RemoteSequence:
    """A model's committed context on the remote backend: its token ids (the server caches their KV entries).

    ``ids [L]``: the prompt and the committed steps in this model's tokens."""

    def __init__(self, ids):
        self.ids: list[int] = list(ids)
