"""The build: every .cu compiles for sm_90 with nvcc alone, and a missing core is rebuilt at import."""

import os
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


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: p.name)
def test_cuda_kernel_compiles_for_sm90(cu_file, tmp_path):
    # The half-type conversion switches torch's extension build passes, so code that compiles here also
    # compiles there.
    cmd = [find_nvcc(), "-std=c++17", "-O3", "-gencode", "arch=compute_90a,code=sm_90a",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", "-c", str(cu_file),
           "-o", str(tmp_path / (cu_file.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_core_is_built_once_at_import(tmp_path):
    """Without a prebuilt dreamr._C, the first import JIT-builds the core and says so; the next reuses it."""
    shutil.copytree(ROOT / "dreamr", tmp_path / "dreamr", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), DREAMR_CACHE=str(tmp_path / "cache"), DREAMR_NO_CUDA="1")
    # Drop the editable-install finder, which would still find the prebuilt dreamr._C in the checkout.
    script = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
              "import torch, dreamr.ops as o; c, a = o.cpn_verify(torch.ones(1, 4), torch.eye(4), [0], [1], 0.5); "
              "print(o.__file__, round(c.item(), 4), bool(a.item()))")
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "building it once" in first.stderr
    assert str(tmp_path) in first.stdout and "0.5 False" in first.stdout
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "0.5 False" in second.stdout and "building" not in second.stderr

