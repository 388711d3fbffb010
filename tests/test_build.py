"""The build: every .cu compiles for sm_90 with nvcc alone and the build's flags (no fast math: the PTX holds
no approximate transcendental), setup.py reads its flags from dreamr._extension, and a missing core is
rebuilt at import."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def test_there_are_cuda_kernels():
    assert {p.stem for p in CU_FILES} >= {"cpn", "rollback", "sampling"}


def build_nvcc_flags(extra=()):
    """The nvcc flags the real build passes for a .cu file: dreamr._extension.compile_flags (the one place
    setup.py and the JIT build take them from) plus torch's own CUDA flags (half-type switches, relaxed
    constexpr), which torch's extension build adds to every .cu."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    from dreamr._extension import compile_flags

    return ["-std=c++17", *COMMON_NVCC_FLAGS, *compile_flags(with_cuda=True)["nvcc"], *extra,
            f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}"]


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: p.name)
def test_cuda_kernel_compiles_for_sm90(cu_file, tmp_path):
    # The half-type conversion switches torch's extension build passes, so code that compiles here also
    # compiles there.
    cmd = [find_nvcc(), *build_nvcc_flags(), "-gencode", "arch=compute_90,code=sm_90", "-c", str(cu_file),
           "-o", str(tmp_path / (cu_file.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# Approximate PTX instructions allowed in the build's output: the seeds that CUDA's precise expf and tanhf
# (2 ulp) evaluate on a range-reduced argument, and the reciprocal seed of IEEE double division. Fast math
# would add tanh.approx, lg2.approx, div.approx and ex2.approx on the raw argument, and put .ftz on plain
# arithmetic (add.ftz.f32, setp.*.ftz, ...), flushing denormals that the CPU keeps.
PRECISE_LIBRARY_APPROX = {"ex2.approx.ftz.f32", "rcp.approx.ftz.f32", "rcp.approx.ftz.f64"}
_APPROX_OR_FTZ = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9]*(?:\.[a-z0-9]+)*)", re.MULTILINE)


def fast_math_instructions(ptx: str) -> set[str]:
    """The PTX opcodes that only fast math (or an explicit approximate intrinsic) produces."""
    opcodes = set(_APPROX_OR_FTZ.findall(ptx))
    return {op for op in opcodes if (".approx" in op or ".ftz" in op or op.startswith("div.full"))
            and op not in PRECISE_LIBRARY_APPROX}


def compile_ptx(cu_file, tmp_path, extra=()):
    out = tmp_path / (cu_file.stem + "".join(extra).replace("-", "_") + ".ptx")
    cmd = [find_nvcc(), *build_nvcc_flags(extra), "-arch=compute_90", "--ptx", str(cu_file), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out.read_text()


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed")
def test_cpn_kernel_ptx_has_no_fast_math(tmp_path):
    """CUDA verdicts equal the CPU's: the CPN epilogue's soft-cap tanh, log-sum-exp and sigmoid compile to
    the precise library routines, not tanh.approx / lg2.approx / div.approx, and nothing is flushed to zero."""
    cpn_cu = ROOT / "csrc" / "cuda" / "cpn.cu"
    assert "--use_fast_math" not in build_nvcc_flags()
    ptx = compile_ptx(cpn_cu, tmp_path)
    assert "tanh.approx" not in ptx
    assert fast_math_instructions(ptx) == set()
    assert re.search(r"^\s*ex2\.approx\.ftz\.f32", ptx, re.MULTILINE)  # expf is there, as the library's routine
    # The check sees fast math when it is on (so the assertions above are not vacuous).
    fast = fast_math_instructions(compile_ptx(cpn_cu, tmp_path, extra=("--use_fast_math",)))
    assert {"tanh.approx.f32", "lg2.approx.ftz.f32", "div.approx.ftz.f32"} <= fast


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("cu_file", [p for p in CU_FILES if p.stem != "cpn"], ids=lambda p: p.name)
def test_other_kernels_ptx_has_no_fast_math(cu_file, tmp_path):
    # Sampling compares float probabilities and logits (greedy argmax): with -ftz a denormal would tie with
    # zero on the GPU but not on the CPU. Rollback moves bytes only.
    assert fast_math_instructions(compile_ptx(cu_file, tmp_path)) == set()


def test_setup_takes_its_flags_from_the_extension_module():
    """setup.py, the JIT build (dreamr._extension._jit_build) and the checks above share compile_flags."""
    setup_py = (ROOT / "setup.py").read_text()
    assert "_extension.compile_flags(with_cuda)" in setup_py and "_extension.sources(with_cuda)" in setup_py
    assert "use_fast_math" not in setup_py
    jit = (ROOT / "dreamr" / "_extension.py").read_text()
    assert "flags = compile_flags(with_cuda)" in jit and 'extra_cuda_cflags=flags["nvcc"]' in jit


def test_stale_build_record_is_decided_before_loading(monkeypatch):
    """A core recorded for another torch is refused from its record alone: it is never imported, since
    loading it would register the dreamr namespace that the rebuilt core needs (a second registration
    aborts the process)."""
    import importlib

    import dreamr.ops  # noqa: F401 - a core is loaded in this process, as in any session that imported dreamr
    from dreamr import _extension

    real_import = importlib.import_module

    def guarded_import(name, *args, **kwargs):
        assert name != "dreamr._C", "the stale core must not be imported"
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", guarded_import)
    monkeypatch.setattr(_extension, "read_build_info", lambda directory: "0.0.0+stale")
    usable, reason = _extension.prebuilt_status()
    assert not usable and "built for torch 0.0.0+stale" in reason
    monkeypatch.setattr(_extension, "read_build_info", lambda directory: None)
    usable, reason = _extension.prebuilt_status()
    assert not usable and "no build record" in reason
    # In this process a core is already loaded: asking for a rebuild must raise, not load a second core.
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_jit_build", lambda reason: pytest.fail("would load a second core"))
    with pytest.raises(ImportError, match="already loaded in this process"):
        _extension.load_extension()
    monkeypatch.setattr(_extension, "read_build_info", lambda directory: torch_version())
    assert _extension.prebuilt_status() == (True, "")


def torch_version():
    import torch

    return torch.__version__


def test_cpu_kernels_are_built_with_openmp():
    # at::parallel_for is an inline OpenMP region: a core compiled without -fopenmp runs every CPU kernel
    # on one thread, silently. The built library then imports no GOMP entry points.
    import importlib.util

    import torch

    import dreamr.ops  # noqa: F401  (builds or loads the core)

    if not torch.backends.openmp.is_available():
        pytest.skip("this torch is built without OpenMP")
    origin = importlib.util.find_spec("dreamr._C").origin
    assert b"GOMP_parallel" in Path(origin).read_bytes(), f"{origin} was built without -fopenmp"


def test_build_record_round_trip(tmp_path):
    from dreamr import _extension

    assert _extension.read_build_info(tmp_path) is None
    path = _extension.write_build_info(tmp_path)
    assert path.name == _extension.BUILD_INFO_NAME and _extension.read_build_info(tmp_path) == torch_version()
    # setup.py writes the record next to the in-place core (dreamr/_C*.so, built by build_ext --inplace).
    if list((ROOT / "dreamr").glob("_C*.so")):
        assert _extension.read_build_info(ROOT / "dreamr") == torch_version()


def test_missing_or_stale_core_is_built_once_at_import(tmp_path):
    """A prebuilt dreamr._C recorded for another torch is not loaded (that would abort the process once
    the rebuilt core registers the same ops): the first import JIT-builds the core and says so; the next
    reuses it, also once the stale file is gone."""
    shutil.copytree(ROOT / "dreamr", tmp_path / "dreamr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    stale = list((tmp_path / "dreamr").glob("_C*.so"))
    if not stale:  # no prebuilt core: a file in its place, which must never be loaded
        stale = [tmp_path / "dreamr" / "_C.abi3.so"]
        stale[0].write_bytes(b"not a library")
    (tmp_path / "dreamr" / "_C_build_info.txt").write_text("torch_version=0.0.0+stale\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), DREAMR_CACHE=str(tmp_path / "cache"), DREAMR_NO_CUDA="1")
    # Drop the editable-install finder, which would still find the prebuilt dreamr._C in the checkout.
    script = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
              "import torch, dreamr.ops as o; c, a = o.cpn_verify(torch.ones(1, 4), torch.eye(4), [0], [1], 0.5); "
              "print(o.__file__, round(c.item(), 4), bool(a.item()))")
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "building it once" in first.stderr and "built for torch 0.0.0+stale" in first.stderr
    assert str(tmp_path) in first.stdout and "0.5 False" in first.stdout
    for path in stale:
        path.unlink()
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "0.5 False" in second.stdout and "building" not in second.stderr

