"""Find or build the compiled core, ``dreamr._C``.

``pip install -e .`` builds ``dreamr/_C*.so`` against the installed torch. If that file is missing, or
was built for another torch (a torch upgrade after the install), the first import builds the same
sources with ``torch.utils.cpp_extension.load`` into a cache folder keyed by the torch version and says
so on stderr. There is deliberately no pure-Python fallback: a missing core is an error, not a slow path.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent / "csrc"
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
    """Compiler flags shared by setup.py and the JIT build."""
    cxx = ["-O3", f"-DDREAMR_TORCH_VERSION={torch.__version__}"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    if with_cuda:
        cxx.append("-DDREAMR_WITH_CUDA")
    return {"cxx": cxx, "nvcc": nvcc}


def _prebuilt_matches() -> bool:
    try:
        module = importlib.import_module("dreamr._C")
    except ImportError:  # missing, or linked against another torch's symbols
        return False
    if getattr(module, "__torch_version__", None) != torch.__version__:
        return False
    return hasattr(torch.ops.dreamr, "cpn_verify")


def _jit_build() -> None:
    from torch.utils import cpp_extension

    with_cuda = cuda_build_possible()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    tag = f"torch{torch.__version__}".replace("+", "_").replace(".", "_")
    build_dir = cache_dir() / "build" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"dreamr_C_{tag}"
    if not (build_dir / f"{name}.so").exists():
        print(
            f"dreamr: no compiled core for torch {torch.__version__} found; building it once into {build_dir} "
            "(about a minute; `pip install --no-build-isolation -e .` builds it ahead of time)",
            file=sys.stderr,
        )
    flags = compile_flags(with_cuda)
    cpp_extension.load(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        extra_include_paths=[str(_SOURCE_ROOT / "include")],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def load_extension() -> None:
    """Make ``torch.ops.dreamr.*`` available, building the core first if needed (once per process)."""
    global _loaded
    if _loaded:
        return
    if not _prebuilt_matches():
        if not _SOURCE_ROOT.exists():
            raise ImportError(
                f"dreamr: the compiled core dreamr._C is missing or built for another torch than "
                f"{torch.__version__}, and the C++ sources to rebuild it are not at {_SOURCE_ROOT}; "
                "reinstall dreamr with `pip install --no-build-isolation .`"
            )
        _jit_build()
    _loaded = True


def has_cuda_kernels() -> bool:
    """True when the loaded core has CUDA kernels registered (torch with CUDA and nvcc at build time)."""
    load_extension()
    return bool(torch.ops.dreamr.built_with_cuda())
