"""dreamr.backends.vllm.launch: finding vLLM's interpreter, resolving models, and the server processes.

The fast tests need no vLLM: ``DREAMR_VLLM_PYTHON`` points at a wrapper that runs a small fake server (an
``http.server`` answering ``/v1/models``) through the same code path as vLLM's (command line, environment,
process group, log file, the wait, stop and kill). The slow test starts a real vLLM server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dreamr.backends.vllm import launch
from dreamr.backends.vllm.launch import VLLMServer

FAKE_SERVER = r'''
import argparse, json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("-m", dest="module")
p.add_argument("--model")
p.add_argument("--served-model-name")
p.add_argument("--host")
p.add_argument("--port", type=int)
args, rest = p.parse_known_args()
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
record = {"argv": sys.argv[1:], "module": args.module, "pid": os.getpid(), "pgid": os.getpgid(0),
          "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_HUB_OFFLINE", "CUDA_"))}}
if mode == "children":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record["child"] = child.pid
folder = os.environ.get("FAKE_VLLM_RECORDS")
if folder:
    with open(os.path.join(folder, f"{args.port}.json"), "w") as f:
        json.dump(record, f)
print(f"fake vllm: serving {args.model} as {args.served_model_name} on {args.host}:{args.port}", flush=True)
if mode == "exit":
    print("fake vllm: ValueError: no architecture in config.json", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, lambda *a: print("fake vllm: SIGTERM ignored", flush=True))
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
time.sleep(float(os.environ.get("FAKE_VLLM_DELAY", "0.3")))
name = "someone-else" if mode == "wrong" else args.served_model_name


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/v1/models":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A fake vLLM interpreter (``$DREAMR_VLLM_PYTHON``); returns the folder of its records (one JSON file per
    port: argv, environment, pid, process group)."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("DREAMR_VLLM_PYTHON", str(wrapper))
    monkeypatch.setenv("FAKE_VLLM_RECORDS", str(records))
    monkeypatch.delenv("FAKE_VLLM_MODE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the servers' default logs: in the test's folder
    return records


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def record(records: Path, server: VLLMServer) -> dict:
    return json.loads((records / f"{server.port}.json").read_text())


def gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        text = stat.read_text()
    except OSError:
        return True
    return text[text.rfind(")") + 2] in "ZX"


# --------------------------------------------------------------------------------------------------
# vllm_python
# --------------------------------------------------------------------------------------------------


def test_vllm_python_explicit_variable(tmp_path, monkeypatch):
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("DREAMR_VLLM_PYTHON", str(exe))
    assert launch.vllm_python() == str(exe)


def test_vllm_python_explicit_variable_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMR_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(RuntimeError, match="DREAMR_VLLM_PYTHON=.*not an executable.*install_vllm_cpu.sh"):
        launch.vllm_python()


def test_vllm_python_nothing_found(tmp_path, monkeypatch):
    monkeypatch.delenv("DREAMR_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("DREAMR_VLLM_VENV", str(tmp_path / "no-venv"))
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match=r"no Python interpreter with vLLM.*bash scripts/install_vllm_cpu\.sh"):
        launch.vllm_python()


def _fake_venv(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    return root / "bin" / "python"


def test_vllm_python_venv_with_vllm(tmp_path, monkeypatch):
    # A venv whose interpreter finds a `vllm` package (here through PYTHONPATH) is chosen, by its own path.
    python = _fake_venv(tmp_path / "venv")
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
    monkeypatch.delenv("DREAMR_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("DREAMR_VLLM_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    assert launch.vllm_python() == str(python)


def test_vllm_python_venv_without_vllm(tmp_path, monkeypatch):
    _fake_venv(tmp_path / "venv")
    monkeypatch.delenv("DREAMR_VLLM_PYTHON", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("DREAMR_VLLM_VENV", str(tmp_path / "venv"))
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match=r"exists but has no vllm package.*install_vllm_cpu\.sh"):
        launch.vllm_python()


def test_vllm_python_current_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("DREAMR_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("DREAMR_VLLM_VENV", str(tmp_path / "no-venv"))
    real = launch.importlib.util.find_spec
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name))
    assert launch.vllm_python() == sys.executable


def test_venv_dir_default(monkeypatch):
    monkeypatch.delenv("DREAMR_VLLM_VENV", raising=False)
    assert launch.venv_dir() == Path.home() / ".cache" / "dreamr" / "vllm-venv"


def test_platform_probe_of_this_interpreter():
    # dreamr's own interpreter has no vllm-cpu distribution; without a CUDA device it is "cpu".
    import torch

    assert launch._platform(sys.executable, None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert launch._platform(sys.executable, "cuda") == "cuda"
    with pytest.raises(ValueError, match="device='tpu'"):
        launch._platform(sys.executable, "tpu")


# --------------------------------------------------------------------------------------------------
# resolve_model
# --------------------------------------------------------------------------------------------------


def test_builtin_name_is_its_converted_folder(tmp_path, monkeypatch):
    from dreamr import models

    monkeypatch.setenv("DREAMR_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / models._MARKER).write_text("{}")
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a converted model is not converted again"))
    for spelling in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"):
        got = launch.resolve_model(spelling)
        assert got == launch.ResolvedModel(model=str(folder), name="smollm2-135m-instruct", local=True)


def test_builtin_name_is_converted_first(tmp_path, monkeypatch):
    from dreamr import models

    monkeypatch.setenv("DREAMR_CACHE", str(tmp_path))
    calls = []

    class Loaded:
        path = tmp_path / "models" / "gemma-3-270m"

    def fake_load(name, **kw):
        calls.append(name)
        Loaded.path.mkdir(parents=True)
        (Loaded.path / models._MARKER).write_text("{}")
        return Loaded()

    with pytest.raises(ValueError, match="target='gemma-3-270m': the built-in model is not converted"):
        launch.resolve_model("gemma-3-270m", arg_name="target", convert=False)
    monkeypatch.setattr(models, "load", fake_load)
    got = launch.resolve_model("gemma-3-270m")
    assert calls == ["gemma-3-270m"]
    assert got.model == str(Loaded.path) and got.name == "gemma-3-270m" and got.local


def test_folder_and_hub_id(model_dir):
    got = launch.resolve_model(model_dir)
    assert got == launch.ResolvedModel(model=str(model_dir.resolve()), name="tiny-model", local=True)
    assert launch.resolve_model("Qwen/Qwen3-32B") == launch.ResolvedModel("Qwen/Qwen3-32B", "Qwen/Qwen3-32B", False)


def test_bad_models_name_the_argument(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^model='.*empty' is a folder without config\.json"):
        launch.resolve_model(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^draft='.*weights\.bin' is a file"):
        launch.resolve_model(str(tmp_path / "weights.bin"), arg_name="draft")
    with pytest.raises(ValueError, match=r"^model='\./no/such/folder' is neither a built-in model name"):
        launch.resolve_model("./no/such/folder")
    with pytest.raises(ValueError, match=r"^model='': give"):
        launch.resolve_model("")
    with pytest.raises(ValueError, match=r"^model=3"):
        launch.resolve_model(3)


def test_bad_settings_are_named(fake_vllm, model_dir):
    for kwargs, name in [({"max_model_len": 0}, "max_model_len"), ({"kv_cache_gib": 1.5}, "kv_cache_gib"),
                         ({"cpu_core": "first"}, "cpu_core"), ({"cpu_core": True}, "cpu_core"),
                         ({"port": 70000}, "port"), ({"extra_args": "--tensor-parallel-size 4"}, "extra_args"),
                         ({"device": "tpu"}, "device")]:
        with pytest.raises(ValueError, match=f"^{name}="):
            VLLMServer.start(model_dir, **kwargs)


# --------------------------------------------------------------------------------------------------
# The process: start, wait, log, stop, kill (a fake server through the real code path)
# --------------------------------------------------------------------------------------------------


def test_start_waits_until_it_answers_then_stops(fake_vllm, model_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("FAKE_VLLM_DELAY", "1.0")  # listens only after a second: start must wait for it
    server = VLLMServer.start(model_dir, served_model_name="tiny", cpu_core=1, kv_cache_gib=2, dtype="float32",
                              max_model_len=512, device="cpu", extra_args=["--seed", "7"], timeout_s=30)
    try:
        assert server.alive and server.url == f"http://127.0.0.1:{server.port}"
        assert server.served_model_name == "tiny" and server.served_models() == ["tiny"]
        assert server.startup_s is not None and server.startup_s >= 1.0
        rec = record(fake_vllm, server)
        assert rec["module"] == "vllm.entrypoints.openai.api_server"
        argv = rec["argv"]
        for flag, value in [("--model", str(model_dir.resolve())), ("--served-model-name", "tiny"),
                            ("--host", "127.0.0.1"), ("--port", str(server.port)), ("--max-model-len", "512"),
                            ("--dtype", "float32"), ("--seed", "7")]:
            assert argv[argv.index(flag) + 1] == value
        assert "--enforce-eager" in argv
        assert rec["env"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
        assert rec["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "1"
        assert rec["env"]["HF_HUB_OFFLINE"] == "1"
        assert rec["pgid"] == rec["pid"] == server.process.pid  # its own process group
        log = server.log_path.read_text()
        assert "VLLM_CPU_KVCACHE_SPACE=2" in log and "fake vllm: serving" in log
    finally:
        server.stop(grace_s=5)
    assert not server.alive and server.group_members() == [] and server.served_models() is None
    server.stop()  # a second stop does nothing


def test_cuda_build_gets_no_cpu_settings(fake_vllm, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # set by the caller: left alone
    with VLLMServer.start(model_dir, cpu_core=0, device="cuda", env={"CUDA_VISIBLE_DEVICES": "2,3"},
                          extra_args=["--tensor-parallel-size", "2"], timeout_s=30) as server:
        rec = record(fake_vllm, server)
        assert server.platform == "cuda"
        assert not any(k.startswith("VLLM_CPU_") for k in rec["env"])
        assert rec["env"]["HF_HUB_OFFLINE"] == "0" and rec["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
        assert "--enforce-eager" not in rec["argv"] and "--tensor-parallel-size" in rec["argv"]
    assert not server.alive


def test_hub_id_leaves_hf_offline_unset(fake_vllm, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with VLLMServer.start("Qwen/Qwen3-32B", device="cpu", timeout_s=30) as server:
        rec = record(fake_vllm, server)
        assert server.served_model_name == "Qwen/Qwen3-32B" and "HF_HUB_OFFLINE" not in rec["env"]
        assert rec["argv"][rec["argv"].index("--model") + 1] == "Qwen/Qwen3-32B"


def test_exit_before_answering_raises_with_the_log(fake_vllm, model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_VLLM_MODE", "exit")
    log = tmp_path / "logs" / "server.log"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3 before it answered.*no architecture in config"):
        VLLMServer.start(model_dir, device="cpu", log_path=log, timeout_s=60)
    assert time.monotonic() - t0 < 20  # seen when it exits, not at the timeout
    assert "no architecture" in log.read_text()


def test_timeout_kills_it(fake_vllm, model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    with pytest.raises(RuntimeError, match=r"did not answer on http://127\.0\.0\.1:\d+/v1/models within 1\.5 s"):
        VLLMServer.start(model_dir, device="cpu", timeout_s=1.5)
    pid = json.loads(next(fake_vllm.glob("*.json")).read_text())["pid"]
    assert gone(pid)


def test_another_model_on_the_port_raises(fake_vllm, model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "wrong")
    with pytest.raises(RuntimeError, match=r"answers with \['someone-else'\], not 'tiny-model'"):
        VLLMServer.start(model_dir, device="cpu", timeout_s=30)


def test_taken_port_is_refused(fake_vllm, model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port={port}: something already listens"):
            VLLMServer.start(model_dir, port=port, device="cpu", timeout_s=30)
    assert list(fake_vllm.glob("*.json")) == []  # nothing was started


def test_stop_kills_what_ignores_sigterm(fake_vllm, model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "stubborn")
    server = VLLMServer.start(model_dir, device="cpu", timeout_s=30)
    t0 = time.monotonic()
    server.stop(grace_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 10
    assert server.returncode == -signal.SIGKILL and server.group_members() == []
    assert "SIGTERM ignored" in server.log_tail()


def test_stop_and_kill_reach_the_whole_group(fake_vllm, model_dir, monkeypatch):
    # vLLM's engine and worker are child processes: stopping the server stops them too.
    monkeypatch.setenv("FAKE_VLLM_MODE", "children")
    for end in ("stop", "kill"):
        server = VLLMServer.start(model_dir, device="cpu", timeout_s=30)
        child = record(fake_vllm, server)["child"]
        assert child in server.group_members() and not gone(child)
        t0 = time.monotonic()
        getattr(server, end)()
        assert gone(child) and server.group_members() == [] and not server.alive
        if end == "kill":
            assert server.returncode == -signal.SIGKILL and time.monotonic() - t0 < 5
            server.stop()  # nothing left to do


def test_start_pair_binds_two_cores(fake_vllm, model_dir, tmp_path, monkeypatch):
    draft_dir = tmp_path / "draft-model"
    draft_dir.mkdir()
    (draft_dir / "config.json").write_text("{}")
    monkeypatch.setattr(launch, "_cores", lambda: 2)
    target, draft = launch.start_pair(model_dir, draft_dir, device="cpu", dtype="float32", timeout_s=30,
                                      draft_extra_args=["--seed", "1"])
    try:
        assert target.port != draft.port
        assert (target.served_model_name, draft.served_model_name) == ("tiny-model", "draft-model")
        t, d = record(fake_vllm, target), record(fake_vllm, draft)
        assert t["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0" and d["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "1"
        assert "--seed" in d["argv"] and "--seed" not in t["argv"]
    finally:
        target.stop()
        draft.stop()
    monkeypatch.setattr(launch, "_cores", lambda: 1)
    target, draft = launch.start_pair(model_dir, draft_dir, device="cpu", timeout_s=30)
    try:
        assert "VLLM_CPU_OMP_THREADS_BIND" not in record(fake_vllm, target)["env"]
    finally:
        target.stop()
        draft.stop()


def test_start_pair_stops_both_when_one_fails(fake_vllm, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^draft='.*nowhere' is neither"):
        launch.start_pair(model_dir, str(tmp_path / "nowhere"), device="cpu", timeout_s=30)
    assert list(fake_vllm.glob("*.json")) == []  # a bad model starts nothing
    with pytest.raises(RuntimeError, match=r"(?s)'tiny-model' .* exited with code 3.*no architecture"):
        launch.start_pair(model_dir, model_dir, draft_name="tiny-model", target_name="target", device="cpu",
                          timeout_s=30, draft_env={"FAKE_VLLM_MODE": "exit"})
    pids = [json.loads(f.read_text())["pid"] for f in fake_vllm.glob("*.json")]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)  # the target, which did start, is stopped too
    with pytest.raises(TypeError, match="cpu_core="):
        launch.start_pair(model_dir, model_dir, cpu_core=1)


def test_command_line(fake_vllm, model_dir, tmp_path):
    ports = [launch.free_port(), launch.free_port()]
    while ports[1] == ports[0]:
        ports[1] = launch.free_port()
    cmd = [sys.executable, "-m", "dreamr.backends.vllm.launch", "--target", str(model_dir), "--draft", str(model_dir),
           "--target-port", str(ports[0]), "--draft-port", str(ports[1]), "--device", "cpu",
           "--log-dir", str(tmp_path / "logs"), "--", "--tensor-parallel-size", "2"]
    err_path = tmp_path / "launcher.err"  # a file, not a pipe nobody drains while the launcher runs
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("running"):
                break
        out = "".join(lines)
        assert f"dreamr: python -m dreamr.serve --target-url http://127.0.0.1:{ports[0]} " \
               f"--draft-url http://127.0.0.1:{ports[1]}" in out, out + err_path.read_text()
        target, draft = (json.loads((fake_vllm / f"{p}.json").read_text()) for p in ports)
        assert "--tensor-parallel-size" in target["argv"] and "--tensor-parallel-size" not in draft["argv"]
        assert (tmp_path / "logs" / f"target-{ports[0]}.log").is_file()
        proc.send_signal(signal.SIGINT)
        try:  # each server gets up to its 30 s grace to stop (a loaded CI machine is slow)
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not stop within 120 s of Ctrl-C; its stderr:\n{err_path.read_text()}")
        assert code == 0, err_path.read_text()
        assert gone(target["pid"]) and gone(draft["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_reports_a_bad_model(fake_vllm, tmp_path):
    done = subprocess.run([sys.executable, "-m", "dreamr.backends.vllm.launch", "--target", str(tmp_path / "nope"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: target=" in done.stderr


# --------------------------------------------------------------------------------------------------
# A real vLLM server (slow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_vllm_server_starts_answers_and_stops(vllm_server_factory):
    from dreamr.models import converted_path

    folder = launch.resolve_model("smollm2-135m-instruct").model
    assert folder == str(converted_path("smollm2-135m-instruct"))
    server = vllm_server_factory(folder, served_model_name="smollm2-test")
    print(f"vLLM server for {folder} answered after {server.startup_s:.1f} s")
    assert server.served_models() == ["smollm2-test"]
    members = server.group_members()
    assert server.process.pid in members and len(members) >= 2  # the API server and vLLM's engine processes
    server.stop()
    assert not server.alive and server.group_members() == [] and server.served_models() is None


@pytest.mark.slow
def test_real_vllm_pair(vllm_pair):
    target, draft = vllm_pair
    print(f"vLLM pair answered after {target.startup_s:.1f} s (target) and {draft.startup_s:.1f} s (draft)")
    assert target.served_models() == ["gemma-3-270m"] and draft.served_models() == ["smollm2-135m-instruct"]
    assert target.port != draft.port and target.alive and draft.alive
    if target.platform == "cpu" and launch._cores() >= 2:
        assert (target.env["VLLM_CPU_OMP_THREADS_BIND"], draft.env["VLLM_CPU_OMP_THREADS_BIND"]) == ("0", "1")
