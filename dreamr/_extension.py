"""Find or build the compiled core, ``dreamr._C``.

``pip install -e .`` builds ``dreamr/_C*.so`` against the installed torch and records that torch's
version next to it, in ``_C_build_info.txt``. The record is read *before* the library is loaded:
loading a core built for another torch registers the ``dreamr`` op namespace, and a rebuilt core
registering it a second time would abort the process. If the library is missing, or its record is
missing or names another torch (a torch upgrade after the install), the first import builds the same
sources with ``torch.utils.cpp_extension.load`` into a cache folder keyed by the torch version and says
so on stderr. There is deliberately no pure-Python fallback: a missing core is an error, not a slow path.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent / "csrc"
#: Written next to the compiled core by setup.py and the JIT build: the torch version it was built for.
BUILD_INFO_NAME = "_C_build_info.txt"
_loaded: bool = False


def cache_dir() -> Path:
    """dreamr's cache folder: ``$DREAMR_CACHE``, else ``$XDG_CACHE_HOME/dreamr``, else ``~/.cache/dreamr``."""
    root = os.environ.get("DREAMR_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dreamr"


def sources(with_cuda: bool) -> list[str]:
    """The extension's translation units (shared with setup.py so the two builds cannot drift)."""
    files = ["bindings.cpp", "cpu/ops_cpu.cpp", "scheduler/fpsr_scheduler.cpp"]
    if with_cuda:
        files += ["cuda/ops_cuda.cpp"] + sorted(
            os.path.relpath(p, _SOURCE_ROOT) for p in glob.glob(str(_SOURCE_ROOT / "cuda" / "*.cu"))
        )
    return [str(_SOURCE_ROOT / f) for f in files if (_SOURCE_ROOT / f).exists()]


def cuda_build_possible() -> bool:
    """True when torch has CUDA and a CUDA toolkit (nvcc) can be found, unless DREAMR_NO_CUDA=1."""
    if torch.version.cuda is None or os.environ.get("DREAMR_NO_CUDA", "0") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists()


def compile_flags(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler flags shared by setup.py, the JIT build and tests/test_build.py's PTX check.

    Parameters
    ----------
    with_cuda : bool
        Whether the CUDA kernels are built (adds ``-DDREAMR_WITH_CUDA`` to the C++ flags).

    Returns
    -------
    dict
        ``{"cxx": [...], "nvcc": [...]}``, as ``extra_compile_args`` takes them.
    """
    cxx = ["-O3", f"-DDREAMR_TORCH_VERSION={torch.__version__}"]
    # No --use_fast_math: it turns the CPN epilogue's tanh/exp/log into tanh.approx / ex2.approx on unreduced
    # arguments and flushes denormals (-ftz), so GPU verdicts near alpha would differ from the CPU's (the
    # CUDA and CPU kernels share one epilogue, csrc/include/dreamr/cpn.h, and must decide alike). The
    # kernels are memory-bound (dot products over the verdict rows, vocabulary scans, cache copies), so the
    # precise math costs nothing measurable; rollback does no float math at all.
    nvcc = ["-O3", "-lineinfo"]
    if torch.backends.openmp.is_available():
        # at::parallel_for is an inline OpenMP region: without -fopenmp here it silently runs serially.
        cxx.append("-fopenmp")
    if with_cuda:
        cxx.append("-DDREAMR_WITH_CUDA")
    return {"cxx": cxx, "nvcc": nvcc}


def link_flags() -> list[str]:
    """Linker flags shared by setup.py and the JIT build (libgomp for the OpenMP regions above)."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def write_build_info(directory: os.PathLike) -> Path:
    """Record, in ``directory``, the torch version the core next to it was built for."""
    path = Path(directory) / BUILD_INFO_NAME
    path.write_text(f"torch_version={torch.__version__}\n")
    return path


def read_build_info(directory: os.PathLike) -> Optional[str]:
    """The torch version recorded in ``directory`` by :func:`write_build_info`, or None if there is none."""
    try:
        text = (Path(directory) / BUILD_INFO_NAME).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "torch_version":
            return value.strip()
    return None


def prebuilt_status() -> tuple[bool, str]:
    """Whether the prebuilt ``dreamr._C`` may be loaded, decided without loading it, and why not.

    Only the file's location and its build record are read: importing a core built for another torch
    would register the ``dreamr`` op namespace, after which the JIT-built core could not be loaded.
    """
    try:
        spec = importlib.util.find_spec("dreamr._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return False, "dreamr._C is not built"
    recorded = read_build_info(Path(spec.origin).parent)
    if recorded is None:
        return False, f"{spec.origin} has no build record ({BUILD_INFO_NAME}) saying which torch it was built for"
    if recorded != torch.__version__:
        return False, f"{spec.origin} was built for torch {recorded}"
    return True, ""


def _core_registered() -> bool:
    """True when some dreamr core has already registered its ops in this process."""
    return hasattr(torch.ops.dreamr, "built_with_cuda")


def _load_prebuilt() -> None:
    module = importlib.import_module("dreamr._C")
    built_for = getattr(module, "__torch_version__", None)
    if built_for != torch.__version__:  # the record lied; the namespace is taken now, so no rebuild here
        raise ImportError(
            f"dreamr: {module.__file__} was built for torch {built_for} but its build record says "
            f"{torch.__version__}; rebuild it with `pip install --no-build-isolation -e .` (or delete it to have "
            "it rebuilt at import)"
        )


def _jit_build(reason: str) -> None:
    from torch.utils import cpp_extension

    with_cuda = cuda_build_possible()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    tag = f"torch{torch.__version__}".replace("+", "_").replace(".", "_")
    build_dir = cache_dir() / "build" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"dreamr_C_{tag}"
    if not (build_dir / f"{name}.so").exists() or read_build_info(build_dir) != torch.__version__:
        print(
            f"dreamr: no compiled core for torch {torch.__version__} found ({reason}); building it once into "
            f"{build_dir} (about a minute; `pip install --no-build-isolation -e .` builds it ahead of time)",
            file=sys.stderr,
        )
    flags = compile_flags(with_cuda)
    cpp_extension.load(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=flags["cxx"],
        extra_ldflags=link_flags(),
        extra_cuda_cflags=flags["nvcc"],
        extra_include_paths=[str(_SOURCE_ROOT / "include")],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    write_build_info(build_dir)


def load_extension() -> None:
    """Make ``torch.ops.dreamr.*`` available, building the core first if needed (once per process)."""
    global _loaded
    if _loaded:
        return
    usable, reason = prebuilt_status()
    if usable:
        try:
            _load_prebuilt()
        except ImportError as error:  # e.g. undefined symbols: nothing was registered, so a rebuild can load
            if _core_registered() or not _SOURCE_ROOT.exists():
                raise
            usable, reason = False, f"importing it failed: {error}"
    if not usable:
        if not _SOURCE_ROOT.exists():
            raise ImportError(
                f"dreamr: the compiled core dreamr._C cannot be used with torch {torch.__version__} ({reason}), "
                f"and the C++ sources to rebuild it are not at {_SOURCE_ROOT}; reinstall dreamr with "
                "`pip install --no-build-isolation .`"
            )
        if _core_registered():
            # Loading a second core would register the dreamr namespace twice and abort the process.
            raise ImportError(
                f"dreamr: the compiled core dreamr._C cannot be used with torch {torch.__version__} ({reason}), "
                "but a dreamr core is already loaded in this process, so a rebuilt one cannot be loaded next to "
                "it; restart Python after `pip install --no-build-isolation -e .`"
            )
        _jit_build(reason)
    _loaded = True


def has_cuda_kernels() -> bool:
    """True when the loaded core has CUDA kernels registered (torch with CUDA and nvcc at build time)."""
    load_extension()
    return bool(torch.ops.dreamr.built_with_cuda())
