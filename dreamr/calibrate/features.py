"""The target's final hidden state at the verdict position, extracted in batches with one cached prefix.

The judge reads what the reasoner's target reads (see ``docs/architecture.md``): the prompt in the
target's tokens (chat messages, system prompt first, through the target's chat template, as
``python -m dreamr`` and ``dreamr.eval`` send it), then each committed step tokenized on its own, then the
step under judgement and the verdict prompt of :class:`dreamr.verify.StepVerifier` (with the delimiter in
front where the step does not end with it). The hidden state is the decoder's output after its final
norm at the verdict prompt's last token: what :func:`dreamr.ops.cpn_verify` takes.

One prefix (question + context steps) is prefilled once, at batch size 1; the steps judged after it
(the good step, the bad ones and the content-free null step) are one right-padded batch on a copy of
the prefix's KV cache expanded to the batch. Right padding needs no attention mask: causal attention
keeps every real token from seeing the pads after it. Consecutive prefixes that extend one another (the
positions of one solution) reuse the cached prefix: only the new context steps are fed. No LM head is
applied: no ``[B, V]`` logits are formed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from dreamr.cache import cache_kwarg, cache_length
from dreamr.lm import LM
from dreamr.prompts import SYSTEM_PROMPT, chat_messages
from dreamr.verify import StepVerifier
from dreamr.verify.head import NULL_STEP

__all__ = ["default_system_prompt", "FeatureExtractor"]


def default_system_prompt() -> str:
    """The system prompt dreamr's CLI and evaluation send (:data:`dreamr.prompts.SYSTEM_PROMPT`)."""
    return SYSTEM_PROMPT


class FeatureExtractor:
    """Final hidden states of a target at the verdict position, one cached prefix per group of steps.

    Parameters
    ----------
    model, tokenizer : the target (a transformers causal LM) and its tokenizer
    template : str, optional
        The verdict prompt (default: the reasoner's, :data:`dreamr.verify.DEFAULT_TEMPLATE`).
    delimiter : str
        The step delimiter; a step that does not end with it gets it appended, as drafted steps do.
    chat : bool, optional
        Send the question as chat messages (system prompt, then the question) through the chat template;
        default: when the tokenizer has a chat template. False: the question as plain text.
    system_prompt : str or None, optional
        The system message (default :func:`default_system_prompt`); None or "" for none.
    null_step : str
        The content-free step scored after every prefix (:data:`dreamr.verify.head.NULL_STEP`).
    max_rows : int
        The largest batch of steps fed at once.
    """

    def __init__(self, model, tokenizer, *, template: Optional[str] = None, delimiter: str = "\n\n",
                 chat: Optional[bool] = None, system_prompt: Optional[str] = "default",
                 null_step: str = NULL_STEP, max_rows: int = 16):
        self.verifier = StepVerifier(model, tokenizer, template=template, delimiter=delimiter)
        self.lm = LM(model, self.verifier.tokenizer, "target")
        self.template = self.verifier.template
        self.delimiter = delimiter
        self.chat = bool(getattr(self.lm.tokenizer, "chat_template", None)) if chat is None else bool(chat)
        self.system_prompt = default_system_prompt() if system_prompt == "default" else (system_prompt or None)
        if not isinstance(null_step, str) or not null_step.strip():
            raise ValueError(f"null_step must be a non-empty string, got {null_step!r}")
        self.null_step = null_step
        self.max_rows = max(1, int(max_rows))
        self.decoder = self.lm.decoder
        self._cache_kw = cache_kwarg(self.decoder)
        self._prefix_ids: list[int] = []
        self._cache: Optional[DynamicCache] = None
        self.tokens_fed = 0  # for throughput reports

    @property
    def hidden_size(self) -> int:
        return self.verifier.hidden_size

    def framing(self) -> dict:
        """How the prompt is framed, for a head's metadata."""
        return {"chat": self.chat, "system_prompt": self.system_prompt if self.chat else None,
                "delimiter": self.delimiter, "null_step": self.null_step}

    # -- token ids ----------------------------------------------------------------------------------

    def prompt(self, question: str):
        """The prompt as the reasoner receives it: chat messages, or the plain question."""
        return chat_messages(question, self.system_prompt) if self.chat else question

    def step_text(self, step: str) -> str:
        """A step as a drafted step reads: ending with the delimiter."""
        return step if step.endswith(self.delimiter) else step + self.delimiter

    def prefix_ids(self, question: str, context_steps: Sequence[str]) -> list[int]:
        """Prompt ids followed by each context step's ids (each tokenized on its own, as committed)."""
        ids = list(self.lm.encode_prompt(self.prompt(question)))
        for step in context_steps:
            ids += self.lm.encode_text(self.step_text(step))
        return ids

    def judged_ids(self, step: str) -> list[int]:
        """A judged step's ids followed by the verdict prompt's."""
        text = self.step_text(step)
        return self.lm.encode_text(text) + list(self.verifier.suffix_ids(text))

    # -- forward passes -----------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = self.decoder(input_ids=ids, use_cache=True, **{self._cache_kw: cache})
        self.tokens_fed += int(ids.numel())
        return out.last_hidden_state

    def _advance(self, ids: list[int]) -> None:
        """Make the kept batch-1 cache hold exactly ``ids``, feeding only what it lacks."""
        common = 0
        if self._cache is not None:
            limit = min(len(ids), len(self._prefix_ids))
            while common < limit and ids[common] == self._prefix_ids[common]:
                common += 1
        if common == 0:
            self._cache = DynamicCache()
        elif common < cache_length(self._cache):
            self._cache.crop(common - cache_length(self._cache))
        if len(ids) > common:
            x = torch.tensor([ids[common:]], dtype=torch.long, device=self.lm.device)
            self._forward(x, self._cache)
        self._prefix_ids = list(ids)

    def _expanded(self, rows: int) -> DynamicCache:
        """A new cache holding the kept prefix for ``rows`` rows (the kept cache stays as it is)."""
        cache = DynamicCache()
        for i, layer in enumerate(self._cache.layers):
            k, v = layer.keys, layer.values
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return cache

    @torch.no_grad()
    def hidden(self, question: str, context_steps: Sequence[str], steps: Sequence[str],
               with_null: bool = True) -> torch.Tensor:
        """Hidden states at the verdict position of each of ``steps`` after ``question`` + ``context_steps``.

        Returns
        -------
        Tensor, shape ``[len(steps) + 1, H]`` (``[len(steps), H]`` without the null), float32 on the CPU;
        the last row is the null step's where ``with_null``.
        """
        prefix = self.prefix_ids(question, context_steps)
        if len(prefix) < 1:
            raise ValueError("question: empty after tokenization")
        self._advance(prefix)
        judged = list(steps) + ([self.null_step] if with_null else [])
        out = []
        for start in range(0, len(judged), self.max_rows):
            chunk = [self.judged_ids(s) for s in judged[start:start + self.max_rows]]
            width = max(len(r) for r in chunk)
            x = torch.zeros(len(chunk), width, dtype=torch.long, device=self.lm.device)
            for i, r in enumerate(chunk):
                x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            h = self._forward(x, self._expanded(len(chunk)))
            last = torch.tensor([len(r) - 1 for r in chunk], device=h.device)
            out.append(h[torch.arange(len(chunk), device=h.device), last].float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def lm_cpn(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's own verdict (its Yes/No LM-head rows, through the fused op) on ``hidden [B, H]``."""
        cpn, _ = self.verifier.cpn(hidden.to(self.lm.device), 0.5)
        return cpn.float().cpu()

    def reset(self) -> None:
        """Drop the kept prefix cache."""
        self._cache, self._prefix_ids = None, []
