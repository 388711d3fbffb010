"""The machine an evaluation ran on: library versions, device, and GPU memory and power readings.

GPU readings (memory used, power) are sampled every 0.1 s in a background thread during generation
(nvidia-ml-py); results.json says "no GPU" or "nvidia-ml-py not installed" where there are none.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
from typing import Any, Callable, Optional

__all__ = ["NO_GPU", "NO_NVML", "GpuMonitor", "environment", "models_info"]


NO_GPU = "no GPU"
NO_NVML = "nvidia-ml-py not installed"


class GpuMonitor:
    """GPU name, memory used and power through nvidia-ml-py, sampled in a background thread.

    ``start()`` samples every ``interval`` seconds (default 0.1) in a daemon thread until ``stop()``
    (the evaluation runs it around generation); ``sample()`` takes one reading now; ``summary()`` gives
    the names, total memory, the largest memory used and mean / max power seen. Without readings the
    summary says why, distinctly: ``{"gpu": "nvidia-ml-py not installed", ...}`` when the ``pynvml``
    module is missing (``pip install nvidia-ml-py``), ``{"gpu": "no GPU", ...}`` when NVML finds no
    driver or no NVIDIA GPU. Nothing here raises: a failing reading is recorded in ``error``.

    ``sampler`` (tests, other backends): a function returning one reading, a list with one dict per GPU
    (``memory_used_mib`` / ``power_w``); it replaces NVML.
    """

    def __init__(self, interval: float = 0.1, sampler: Optional[Callable[[], list]] = None):
        if not (isinstance(interval, (int, float)) and interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.error: Optional[str] = None
        self.status: Optional[str] = None  # None: readings available; else NO_GPU or NO_NVML
        self._nvml = None
        self._handles: list = []
        self._samples: list[list[dict]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sampler = sampler
        if sampler is None:
            try:
                import pynvml
            except ImportError as exc:
                self.status, self.error = NO_NVML, f"{type(exc).__name__}: {exc} (pip install nvidia-ml-py)"
            else:
                try:
                    pynvml.nvmlInit()
                    self._nvml = pynvml
                    self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                except Exception as exc:  # noqa: BLE001 - NVMLError without a driver
                    self.error = f"{type(exc).__name__}: {exc}"
                    self._handles = []
                if not self._handles:
                    self.status = NO_GPU
                    self.error = self.error or "no NVIDIA GPU found"
        if self.status is None:
            self.sample()

    @property
    def available(self) -> bool:
        return self.status is None

    def _read(self) -> list[dict]:
        if self._sampler is not None:
            return list(self._sampler())
        nv = self._nvml
        reading = []
        for h in self._handles:
            r: dict[str, Any] = {}
            try:
                r["memory_used_mib"] = nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
            except Exception:  # noqa: BLE001
                pass
            try:
                r["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:  # noqa: BLE001 - some boards do not report power
                pass
            reading.append(r)
        return reading

    def sample(self) -> None:
        """Take one reading (no-op without a GPU; a failing reading is recorded in ``error``)."""
        if not self.available:
            return
        try:
            reading = self._read()
        except Exception as exc:  # noqa: BLE001 - a reading never breaks the run
            self.error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            self._samples.append(reading)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "GpuMonitor":
        """Sample every ``interval`` seconds in a daemon thread (no thread without readings)."""
        if self.available and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="dreamr-gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the sampling thread (and take a last reading)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "GpuMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        if not self.available:
            return {"gpu": self.status, "reason": self.error}
        with self._lock:
            samples = list(self._samples)
        n_gpus = len(self._handles) if self._sampler is None else max((len(s) for s in samples), default=0)
        gpus = []
        for i in range(n_gpus):
            info: dict[str, Any] = {"index": i}
            if self._nvml is not None:
                nv, h = self._nvml, self._handles[i]
                try:
                    name = nv.nvmlDeviceGetName(h)
                    info["name"] = name.decode() if isinstance(name, bytes) else name
                    info["memory_total_mib"] = nv.nvmlDeviceGetMemoryInfo(h).total / 2**20
                    info["driver"] = nv.nvmlSystemGetDriverVersion()
                except Exception:  # noqa: BLE001
                    pass
            mem = [s[i]["memory_used_mib"] for s in samples if i < len(s) and "memory_used_mib" in s[i]]
            power = [s[i]["power_w"] for s in samples if i < len(s) and "power_w" in s[i]]
            info["memory_used_mib_max"] = max(mem) if mem else None
            info["power_w_mean"] = statistics.fmean(power) if power else None
            info["power_w_max"] = max(power) if power else None
            info["samples"] = len(samples)
            info["interval_s"] = self.interval
            gpus.append(info)
        out: dict[str, Any] = {"gpu": [g.get("name") for g in gpus], "gpus": gpus}
        if self.error:
            out["last_error"] = self.error
        return out



def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None



def _describe_model(lm) -> dict:
    """One model's class, name, parameter count, dtype and vocabulary size."""
    model = getattr(lm, "model", lm)
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "vocab_size": getattr(getattr(lm, "tokenizer", None), "vocab_size", None),
    }



def environment(reasoner=None, gpu: Optional[GpuMonitor] = None) -> dict:
    """Library versions, Python, platform, torch threads, device and (NVIDIA) GPU readings."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "versions": {name: _version(name) for name in ("dreamr", "torch", "transformers", "tokenizers", "numpy",
                                                       "tqdm", "matplotlib", "nvidia-ml-py")},
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if reasoner is not None:
        device = getattr(reasoner.target, "device", None)
        env["device"] = str(device)
        if device is not None and getattr(device, "type", "") == "cuda":
            env["torch_gpu_name"] = torch.cuda.get_device_name(device)
            env["torch_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    env["gpu"] = (gpu or GpuMonitor()).summary()
    return env



def models_info(reasoner) -> dict:
    """Class, name, parameters, dtype and vocabulary of the reasoner's two models (part of the resume
    fingerprint), and whether they share a tokenizer."""
    return {"target": _describe_model(reasoner.target), "draft": _describe_model(reasoner.draft),
            "same_tokenizer": bool(getattr(reasoner, "same_tokenizer", False))}
