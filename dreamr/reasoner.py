"""``SpeculativeReasoner``: step-level speculative reasoning over two transformers causal LMs.

    from dreamr import SpeculativeReasoner
    reasoner = SpeculativeReasoner.from_pretrained()          # gemma-3-270m judged, SmolLM2 drafts
    result = reasoner.generate("Natalia sold clips to 48 of her friends ...")
    for step in result.steps: print(step.source, step.cpn, step.text)

The mode picks the engine ("target", "draft", "speculative", "fpsr"); all modes take the same requests
and return the same :class:`dreamr.result.Result`, so they can be compared side by side.

Vision-language models (Qwen2-VL / Qwen2.5-VL, LLaVA, ... loaded through the Auto classes, each with
its processor) take images: ``generate(prompt, images=[...])`` (PIL images, paths or tensors) or chat
messages with image parts. Each model's processor builds its inputs; the image prefix is encoded once
per model per request and stays in that model's KV cache (see :mod:`dreamr.multimodal`). A text-only
draft beside a vision-language target drafts from the text alone; the target, which sees the image,
verifies its steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from dreamr.cache import CachedSequence
from dreamr.config import VERIFIED_MODES, ReasonerConfig
from dreamr.engines import ENGINES
from dreamr.lm import LM, Prompt, split_processor
from dreamr.request import Request, build as build_request
from dreamr.result import Result, Step
from dreamr.verify import AdaptiveAlpha, StepVerifier, VerdictHead, resolve_verdict_head

__all__ = ["ReasonerConfig", "SpeculativeReasoner", "StepStream"]


class StepStream:
    """Iterate to receive each :class:`Step` as it is committed; ``result`` is set once it ends.

    A stream runs its request once, so it can be iterated once: a second ``iter()`` raises RuntimeError
    (the steps are generated, not stored; after the run they are in ``result.steps``, and a new
    ``reasoner.stream(...)`` call runs the request again)."""

    def __init__(self, gen):
        self._gen = gen
        self._started = False
        self.result: Optional[Result] = None

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("StepStream: this stream has already been iterated (a stream runs its request once); "
                               "read stream.result.steps after it ends, or call reasoner.stream(...) again")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[Step]:
        self.result = yield from self._gen


def _unwrap(obj, tokenizer, role: str):
    """Accept a model, or an object with .model and .tokenizer (what dreamr.models.load returns).

    Returns ``(model, tokenizer, processor)``; the processor is None unless one was given (a
    vision-language model's processor, as ``<role>_tokenizer`` or the loaded object's ``.processor``)."""
    if hasattr(obj, "model") and hasattr(obj, "tokenizer") and not isinstance(obj, torch.nn.Module):
        model = obj.model
        tok = (getattr(obj, "processor", None) or obj.tokenizer) if tokenizer is None else tokenizer
    else:
        model, tok = obj, tokenizer
    if not isinstance(model, torch.nn.Module) or not callable(model):
        raise ValueError(f"{role}: expected a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    if tok is None:
        raise ValueError(f"{role}_tokenizer: a tokenizer (or processor) is required for the {role} model")
    processor, tok = split_processor(tok)  # a processor: text goes through its tokenizer
    if not (callable(getattr(tok, "encode", None)) and callable(getattr(tok, "decode", None))):
        raise ValueError(f"{role}_tokenizer: expected a tokenizer (or a processor holding one) with encode() and "
                         f"decode(), got {type(tok).__name__} {tok!r:.80}; pass e.g. "
                         "AutoTokenizer.from_pretrained(...) of the model")
    if next(model.parameters(), None) is None:
        raise ValueError(f"{role}: the model has no parameters")
    _check_vocabulary(model, tok, role)
    return model, tok, processor


def _check_vocabulary(model, tok, role: str) -> None:
    """Raise ValueError where the tokenizer has ids past the model's input embedding (e.g. the target's and
    the draft's tokenizers swapped), which would fail deep inside the embedding at the first forward.
    An embedding larger than the tokenizer (padded vocabularies) is fine."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        rows = getattr(get_embeddings(), "num_embeddings", None) if callable(get_embeddings) else None
        size = len(tok)
    except (TypeError, NotImplementedError, AttributeError):
        return  # a model or tokenizer that cannot tell its size: nothing to compare
    if rows is not None and size > int(rows):
        raise ValueError(f"{role}_tokenizer: the tokenizer has {size} tokens but the {role} model "
                         f"({type(model).__name__}) embeds only {int(rows)}; pass the {role} model's own tokenizer "
                         "(are the target's and the draft's tokenizers swapped?)")


def _settings(config, overrides: dict) -> "ReasonerConfig":
    """``config`` (a ReasonerConfig or None: the defaults) with ``overrides`` replacing single fields.

    Raises ValueError for a config of another type, a setting ReasonerConfig does not have (listing
    the valid names) or a bad value."""
    if config is None:
        config = ReasonerConfig()
    elif not isinstance(config, ReasonerConfig):
        raise ValueError(f"config must be a dreamr.ReasonerConfig or None, got {type(config).__name__}; build one "
                         "with ReasonerConfig(alpha=..., ...) or pass the settings as keyword arguments")
    names = [f.name for f in dataclasses.fields(ReasonerConfig)]
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; ReasonerConfig has {names}")
    return dataclasses.replace(config, **overrides) if overrides else config


def _check_kv_cache(lm: LM) -> None:
    """Raise ValueError unless one forward pass of ``lm`` fills a transformers cache."""
    config = lm.model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{lm.name}: encoder-decoder models are not supported; a decoder-only causal LM is needed")
    seq = CachedSequence(lm.model, [int(next(iter(lm.eos_ids), 0))])
    try:
        logits = seq.next_logits()
    except Exception as exc:  # noqa: BLE001 - reported with the model's role
        raise ValueError(f"{lm.name}: the model cannot run with a transformers KV cache "
                         f"(forward with a DynamicCache failed: {exc})") from exc
    if seq.cached != 1 or logits.dim() != 1:
        raise ValueError(f"{lm.name}: the model cannot return a KV cache (a forward pass with a DynamicCache "
                         "left it empty); dreamr needs a causal LM that caches keys and values")


def _same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    if len(a) != len(b) or type(a) is not type(b):
        return False
    ba, bb = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    return ba is not None and bb is not None and ba.to_str() == bb.to_str()


class SpeculativeReasoner:
    """Step-level speculative reasoning (DREAM-R) over a target and a draft causal LM.

    Parameters
    ----------
    target, draft : transformers causal LM, or an object with ``.model`` and ``.tokenizer``
        (e.g. :func:`dreamr.models.load`'s result). The two may use different tokenizers.
    target_tokenizer, draft_tokenizer : tokenizer or processor, optional
        Required where a bare model is given.
    config : ReasonerConfig, optional
        Defaults; ``**overrides`` replace single fields (``alpha=0.5, mode="target"``). A misspelled
        setting raises ValueError listing the valid names.
    device, dtype : optional
        Where the models differ in device or dtype, one must be chosen explicitly: both models are then
        moved / cast to it. Without a choice, mismatched models raise ValueError. ``dtype`` is a floating
        torch dtype or its name ("float32", "bfloat16", ...); ``device`` a torch device or its name.

    Bad arguments raise ValueError naming them before any model runs: settings, dtype, device, a
    tokenizer that is not one (no ``encode``/``decode``), or one with more tokens than its model embeds.
    """

    def __init__(
        self,
        target,
        draft,
        *,
        target_tokenizer=None,
        draft_tokenizer=None,
        config: Optional[ReasonerConfig] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        **overrides,
    ):
        from dreamr.models import _resolve_device, _resolve_dtype

        config = _settings(config, overrides)  # bad settings fail before any model work
        dtype = _resolve_dtype(dtype)
        device = None if device is None else _resolve_device(device)
        t_model, t_tok, t_proc = _unwrap(target, target_tokenizer, "target")
        d_model, d_tok, d_proc = _unwrap(draft, draft_tokenizer, "draft")
        if device is not None or dtype is not None:
            for m in (t_model, d_model):
                m.to(device=device, dtype=dtype)
        t_param, d_param = next(t_model.parameters()), next(d_model.parameters())
        if t_param.device != d_param.device:
            raise ValueError(f"target is on {t_param.device} and draft on {d_param.device}; pass device=... "
                             "to put both on one device")
        if t_param.dtype != d_param.dtype:
            raise ValueError(f"target is {t_param.dtype} and draft is {d_param.dtype}; pass dtype=... to use one "
                             "dtype for both")
        t_model.eval()
        d_model.eval()
        self.target, self.draft = LM(t_model, t_tok, "target", t_proc), LM(d_model, d_tok, "draft", d_proc)
        _check_kv_cache(self.target)
        _check_kv_cache(self.draft)
        self.same_tokenizer = _same_tokenizer(t_tok, d_tok)
        self.config = config
        self._verifiers: dict[tuple, StepVerifier] = {}
        self._heads: dict[str, VerdictHead] = {}
        self._thresholds: dict[tuple, AdaptiveAlpha] = {}
        self._engines = {}
        self._forward_costs = {}  # (role, longest proposal) -> ForwardCost, timed once (Engine.forward_cost)
        self.target.decoder  # the judge's hidden states come from its decoder (ValueError now if it has none)
        self.verifier_for(self.config)  # verdict words are checked now, not at the first request

    @classmethod
    def from_pretrained(
        cls,
        target: Any = None,
        draft: Any = None,
        *,
        dtype: Any = None,
        device: Any = "cpu",
        progress: bool = True,
        verdict_head: Any = "auto",
        cache_dir: Any = None,
        **kwargs,
    ) -> "SpeculativeReasoner":
        """Load both models with :func:`dreamr.models.load`: the built-in names, local paths (transformers
        folders, ``.gguf`` files) or Hugging Face model ids (``target="Qwen/Qwen2.5-1.5B-Instruct"``), as
        transformers takes them.

        A model id is read from the local Hugging Face cache (``$HF_HUB_CACHE``, or ``cache_dir``) where it
        is there, else downloaded into it unless ``HF_HUB_OFFLINE`` is set; an id found nowhere raises
        ValueError naming ``target`` or ``draft``. The built-in names are shortcuts and come first; a
        local path comes before an id of the same spelling.

        ``verdict_head``: "auto" (default) uses the verdict head dreamr ships for a built-in target
        (``dreamr/heads/<name>/``; fitted and calibrated, see :mod:`dreamr.verify.head`) and none for
        other targets; a folder written by ``python -m dreamr.calibrate fit``; or None / "none" for the
        target's own Yes/No verdict. It becomes the config's ``verdict_head``; with ``config=`` given, the
        config's own ``verdict_head`` is kept unless ``verdict_head`` is passed explicitly.

        ``target`` defaults to gemma-3-270m and ``draft`` to SmolLM2-135M-Instruct. ``draft="self"`` or
        ``"self:<k>"`` makes an early-exit self-draft from the target's first k layers (sharing its
        weights; k defaults to a third of the layers); the target then defaults to SmolLM2-135M-Instruct
        (the second default pair). Other keyword arguments go to the constructor (``config=``,
        ``alpha=``, ...).
        """
        from dreamr import models

        # settings, dtype and device are checked before any model is loaded (loading takes a while)
        _settings(kwargs.get("config"), {k: v for k, v in kwargs.items()
                                         if k not in ("config", "target_tokenizer", "draft_tokenizer")})
        models._resolve_dtype(dtype)
        models._resolve_device(device)
        draft = models.DEFAULT_DRAFT if draft is None else draft
        if isinstance(draft, str) and (draft == "self" or draft.startswith("self:")):
            # the second default pair: SmolLM2-135M-Instruct judged by itself, drafted by its first layers
            target = models.DEFAULT_SELF_DRAFT_TARGET if target is None else target
            try:
                k = int(draft.split(":", 1)[1]) if ":" in draft else None
            except ValueError:
                raise ValueError(f"draft={draft!r}: use 'self' or 'self:<number of layers>'") from None
            t, d = models.load_self_draft_pair(target, k, dtype=dtype, device=device, progress=progress,
                                               cache_dir=cache_dir, arg_name="target")
        else:
            target = models.DEFAULT_TARGET if target is None else target
            t = models.load(target, dtype=dtype, device=device, progress=progress, cache_dir=cache_dir,
                            arg_name="target")
            d = models.load(draft, dtype=dtype, device=device, progress=progress, cache_dir=cache_dir,
                            arg_name="draft")
        if kwargs.get("config") is not None:
            if not (isinstance(verdict_head, str) and verdict_head == "auto"):  # named explicitly: it wins
                kwargs["config"] = dataclasses.replace(kwargs["config"],
                                                       verdict_head=resolve_verdict_head(verdict_head, t.name))
        else:
            verdict_head = resolve_verdict_head(verdict_head, t.name)
            if verdict_head is not None:
                kwargs["verdict_head"] = verdict_head
        return cls(t, d, **kwargs)

    # -- plumbing -----------------------------------------------------------------------------------

    def verdict_head(self, config: ReasonerConfig) -> Optional[VerdictHead]:
        """The verdict head ``config.verdict_head`` names (a folder is read once), checked against the
        target; None for the target's own verdict. Raises ValueError naming ``verdict_head``."""
        head = config.verdict_head
        if head is None or isinstance(head, VerdictHead):
            return head
        key = str(head)
        loaded = self._heads.get(key)
        if loaded is None:
            loaded = self._heads[key] = VerdictHead.load(head, self.target.model)
        return loaded

    def verifier_for(self, config: ReasonerConfig) -> StepVerifier:
        """The target's :class:`StepVerifier` for ``config``'s verdict settings (template, words, delimiter,
        verdict head, calibration), made once and kept: requests built under equal settings share it.

        The front puts it into each verifying request (:func:`dreamr.request.build`); engines read it from
        there and never call this. It is public for tests and benchmarks that score steps the way a
        request would. Raises ValueError for verdict words that are no single token of the target."""
        head = self.verdict_head(config)
        key = (config.verdict_template, config.positive_words, config.negative_words, config.step_delimiter,
               None if head is None else id(head), config.calibrate)
        verifier = self._verifiers.get(key)
        if verifier is None:
            verifier = StepVerifier.for_config(self.target.model, self.target.tokenizer, config, head=head,
                                               processor=self.target.processor)
            self._verifiers[key] = verifier
        return verifier

    def threshold_for(self, config: ReasonerConfig) -> Optional[AdaptiveAlpha]:
        """The adaptive threshold of ``config`` (alpha="auto"), one per verifier and target acceptance,
        carried across this reasoner's requests (see :meth:`reset_thresholds`); None for a fixed alpha."""
        if not config.auto_alpha:
            return None
        key = (id(self.verifier_for(config)), config.target_acceptance, config.alpha_gamma)
        threshold = self._thresholds.get(key)
        if threshold is None:
            threshold = self._thresholds[key] = AdaptiveAlpha(config.target_acceptance, config.alpha_gamma)
        return threshold

    def reset_thresholds(self) -> None:
        """Forget what the adaptive thresholds learnt: the next alpha="auto" request starts afresh."""
        self._thresholds.clear()

    def engine(self, mode: str):
        """The engine of ``mode`` over this reasoner's two models, made on first use and kept (FPSR keeps its
        KV storage and CUDA graphs between runs; its knobs are set on it). Raises ValueError for an unknown
        mode."""
        if mode not in ENGINES:
            raise ValueError(f"mode must be one of {sorted(ENGINES)}, got {mode!r}")
        engine = self._engines.get(mode)
        if engine is None:
            engine = ENGINES[mode](self.target, self.draft, same_tokenizer=self.same_tokenizer)
            engine.forward_costs = self._forward_costs  # the models' timings, shared by every mode
            self._engines[mode] = engine
        return engine

    def _config(self, overrides: dict) -> ReasonerConfig:
        config = _settings(self.config, overrides)
        if config.mode in VERIFIED_MODES:
            self.verifier_for(config)  # verdict words checked before any work
        return config

    def _request(self, prompt: Prompt, images, config: ReasonerConfig, name: str = "prompt",
                 images_name: str = "images") -> Request:
        """The request of ``prompt`` under ``config``, built once here and handed to the engine, with the
        target's verifier where the mode verifies (:func:`dreamr.request.build`)."""
        verified = config.mode in VERIFIED_MODES
        verifier = self.verifier_for(config) if verified else None
        threshold = self.threshold_for(config) if verified else None
        return build_request(prompt, images, config, target=self.target, draft=self.draft, verifier=verifier,
                             threshold=threshold, name=name, images_name=images_name)

    # -- public API ---------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, *, images=None, **overrides) -> Result:
        """Run one request (a string, or chat messages) and return its :class:`Result`.

        ``images``: None, one image or a list (PIL images, image file paths, tensors ``[C, H, W]``).
        With a string prompt they come first in one user message, before the text; with chat messages
        they fill, in order, the ``{"type": "image"}`` parts that hold no image of their own. A model the mode
        runs must see them (a vision-language model given with its processor): the target in mode
        "target", the draft in mode "draft", either in "speculative" and "fpsr"; a text-only model beside
        it reads the text alone.
        """
        config = self._config(overrides)
        request = self._request(prompt, images, config)
        return self.engine(config.mode).generate(request)

    def generate_batch(self, prompts: Sequence[Prompt], *, images=None, progress: bool = False,
                       **overrides) -> list[Result]:
        """Run several requests; the results equal running each one alone with :meth:`generate`.

        ``images``, when given, holds one entry per prompt (None, one image, or a list of images)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of prompts (use generate() for one prompt)")
        if not prompts:
            raise ValueError("prompts is empty")
        if images is not None and (isinstance(images, (str, bytes)) or not isinstance(images, Sequence)
                                   or len(images) != len(prompts)):
            got = len(images) if isinstance(images, Sequence) else type(images).__name__
            raise ValueError(f"images must be a list with one entry per prompt ({len(prompts)}; each None, an image or "
                             f"a list of images), got {got}")
        config = self._config(overrides)
        requests = [self._request(p, None if images is None else images[i], config, name=f"prompts[{i}]",
                                  images_name=f"images[{i}]")
                    for i, p in enumerate(prompts)]
        return self.engine(config.mode).run(requests, progress=progress)

    def stream(self, prompt: Prompt, *, images=None, **overrides) -> StepStream:
        """Yield each step as it is committed; the stream's ``result`` holds the Result at the end."""
        config = self._config(overrides)
        request = self._request(prompt, images, config)
        return StepStream(self.engine(config.mode).stream(request))

    def astream(self, prompt: Prompt, *, images=None, **overrides) -> "AsyncStepStream":
        """Run one request in a worker thread and hand each committed step to the event loop.

        The asynchronous face of :meth:`stream`, for servers: the event loop stays free while the models
        run. Settings, the prompt and its images are checked here, at the call (a bad setting raises
        ValueError naming it before anything runs); the run starts at the first ``async for`` step.

        Parameters
        ----------
        prompt : str or list of dict
            A string, or chat messages ``[{"role": ..., "content": ...}, ...]`` (the chat template applies).
        images : optional
            As in :meth:`generate`.
        **overrides
            Single :class:`ReasonerConfig` fields for this request (``mode="target"``, ``alpha=0.5``, ...).

        Returns
        -------
        dreamr.streaming.AsyncStepStream
            ``async for step in stream`` yields each :class:`Step` as it is committed (the steps of
            :meth:`generate` for the same request); ``stream.result`` holds the :class:`Result` once the
            iteration ends, by which time the worker has finished. ``stream.prompt_tokens`` (int) is
            the prompt's length in the tokens of the model that reads it (the target's; the draft's in
            mode "draft"), for servers' usage figures.

        Notes
        -----
        The reasoner runs one request at a time (its models, their caches and the engines' state are not
        shared between concurrent runs): further streams wait their turn, in their own threads.
        ``await stream.aclose()``, cancelling the consuming task or leaving the ``async for`` early
        stops the run after the step being written (the engine's generator is closed in its thread) and
        gives the reasoner back to the next request. An exception in the engine is raised to the
        consumer.

        Examples
        --------
        >>> import asyncio
        >>> from dreamr import SpeculativeReasoner
        >>> from dreamr.testing import draft_tokenizer, target_tokenizer, tiny_llama, tiny_qwen2
        >>> tok_a, tok_b = target_tokenizer(), draft_tokenizer()
        >>> reasoner = SpeculativeReasoner(tiny_llama(tok_a), tiny_qwen2(tok_b), target_tokenizer=tok_a,
        ...                                draft_tokenizer=tok_b, max_step_tokens=6, max_new_tokens=18)
        >>> async def main():
        ...     stream = reasoner.astream("What is 2 + 3?", alpha=0.5)
        ...     texts = [step.text async for step in stream]   # each step as it is committed
        ...     return "".join(texts) == stream.result.text, stream.result.metrics.num_steps == len(texts)
        >>> asyncio.run(main())
        (True, True)
        """
        import asyncio
        import threading

        from dreamr.streaming import AsyncStepStream

        config = self._config(overrides)  # bad settings raise ValueError here, at the call
        request = self._request(prompt, images, config)
        engine = self.engine(config.mode)
        # one run at a time per reasoner (made on first use; dict.setdefault is atomic under the GIL)
        lock = self.__dict__.setdefault("_astream_lock", threading.Lock())

        async def source():
            loop = asyncio.get_running_loop()
            items: asyncio.Queue = asyncio.Queue()  # ("step" | "result" | "error" | "done", item)
            stop = threading.Event()

            def send(kind: str, item=None) -> None:
                try:
                    loop.call_soon_threadsafe(items.put_nowait, (kind, item))
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass

            def work() -> None:
                try:
                    # wait for the run before this one, polling so that a stream closed while it waits
                    # never runs at all
                    while not lock.acquire(timeout=0.05):
                        if stop.is_set():
                            return
                    try:
                        run = engine.stream(request)
                        try:
                            while not stop.is_set():
                                send("step", next(run))
                        except StopIteration as end:
                            send("result", end.value)
                        finally:
                            run.close()  # stopped early: the engine's finally blocks run here, in its thread
                    finally:
                        lock.release()
                except BaseException as exc:  # noqa: BLE001 - raised to the consumer, not lost in the thread
                    send("error", exc)
                finally:
                    send("done")

            threading.Thread(target=work, name="dreamr-astream", daemon=True).start()
            finished, result = False, None
            try:
                while True:
                    kind, item = await items.get()
                    if kind == "step":
                        yield item
                    elif kind == "result":
                        result = item  # handed on once the worker is done and the lock released
                    elif kind == "error":
                        raise item
                    else:
                        finished = True
                        break
                if result is not None:
                    yield result
            finally:
                stop.set()  # the consumer left early (or the run ended): stop after the current step
                while not finished:  # wait for the worker to close the engine's run and release the lock
                    finished = (await items.get())[0] == "done"

        return AsyncStepStream(source(), len(request.target_ids or request.draft_ids))
