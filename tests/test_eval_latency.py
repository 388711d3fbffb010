"""The end-to-end latency section (bench/e2e_latency.py): per-step phase breakdown on tiny models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "e2e_latency.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_latency", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_phase_breakdown_per_mode(e2e, reasoner):
    import dreamr.cache as cache

    saved = cache.rollback
    prompts = ["Natalia sold clips to 48 of her friends in April.", "Step 1: 2 + 2 = 4.\n\n"]
    rows = e2e.bench_end_to_end(reasoner, prompts, ["target", "draft", "speculative"], alphas=[1.0],
                                max_new_tokens=12, max_step_tokens=4)
    assert cache.rollback is saved  # the instrumentation is removed afterwards
    by = {r["mode"]: r for r in rows}
    assert set(by) == {"target", "draft", "speculative"}
    for r in rows:
        assert r["steps"] > 0 and r["tokens"] > 0 and r["step_ms_mean"] > 0
        ph = r["phase_ms_per_step"]
        assert set(ph) == {"drafting", "verification", "target", "rollback", "scheduler", "other"}
        assert sum(ph.values()) == pytest.approx(r["step_ms_mean"], rel=1e-6)
        assert all(v >= 0 for k, v in ph.items() if k != "other")
        assert r["phase_source"] == "hooks"
    assert by["target"]["phase_ms_per_step"]["drafting"] == 0 and by["target"]["phase_ms_per_step"]["target"] > 0
    assert by["draft"]["phase_ms_per_step"]["target"] == 0 and by["draft"]["phase_ms_per_step"]["drafting"] > 0
    spec = by["speculative"]["phase_ms_per_step"]
    # alpha = 1: every step is drafted, verified, rejected (rolled back) and written by the target
    assert by["speculative"]["acceptance"] == 0.0
    assert spec["drafting"] > 0 and spec["verification"] > 0 and spec["target"] > 0 and spec["rollback"] > 0
    assert "speculative@1" in e2e.format_rows(rows)


def test_engine_reported_phases_are_passed_through(e2e, reasoner, monkeypatch):
    from dreamr.engines.base import RequestState

    original = RequestState.result

    def result(self, mode):
        res = original(self, mode)
        res.metrics.verify_time_s = 0.002  # what an engine with its own breakdown would report
        return res

    monkeypatch.setattr(RequestState, "result", result)
    rows = e2e.bench_end_to_end(reasoner, ["Step 1: 2 + 2 = 4.\n\n"], ["speculative"], alphas=[0.5],
                                max_new_tokens=8, max_step_tokens=4, warmup=False)
    from dreamr.result import PHASE_TIME_FIELDS

    phases = rows[0]["engine_phase_ms_per_step"]
    assert set(phases) == set(PHASE_TIME_FIELDS)  # every phase the engines time is passed through
    assert phases["verify_time_s"] == pytest.approx(2.0 / rows[0]["steps"])
    assert phases["draft_time_s"] > 0 and all(v >= 0 for v in phases.values())


def test_fpsr_phases_come_from_the_engine(e2e, reasoner):
    rows = e2e.bench_end_to_end(reasoner, ["Step 1: 2 + 2 = 4.\n\n"], ["fpsr"], alphas=[0.5],
                                max_new_tokens=8, max_step_tokens=4, warmup=False, window=2)
    (r,) = rows
    assert r["phase_source"] == "engine" and r["steps"] > 0
    eng, ph = r["engine_phase_ms_per_step"], r["phase_ms_per_step"]
    assert ph["drafting"] == pytest.approx(eng["draft_time_s"]) and ph["drafting"] > 0
    assert ph["scheduler"] == pytest.approx(eng["scheduler_time_s"])
    assert sum(ph.values()) == pytest.approx(r["step_ms_mean"], rel=1e-6)
    table = e2e.format_rows(rows)
    assert "sched ms" in table and "eng sched" in table and "engine" in table
    assert "fpsr" in e2e.DEFAULT_MODES


def _load_latency():
    import sys

    path = _PATH.parent / "latency.py"
    spec = importlib.util.spec_from_file_location("bench_latency", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_latency_aims_and_e2e_rows_in_the_json(tmp_path, monkeypatch, capsys):
    import json

    lat = _load_latency()
    r = lat.Record("cpn_verify", "reference", "cpu", "B=64 H=8", 1.0, 1.5, 1.5, threads=1)
    assert lat.aim_of(r) == 2.0 and lat.aim_of(lat.Record("cpn_verify", "reference", "cpu", "B=8 H=8", 1, 1, 1, 1)) is None
    assert lat.aim_of(lat.Record("kv_rollback", "per-layer PyTorch loop", "cpu", "B=8", 1, 1, 1, 1)) == 3.0
    fake = [{"variant": "speculative@0.7", "mode": "speculative", "alpha": 0.7, "steps": 3, "phase_ms_per_step": {"drafting": 1.0}}]
    calls = []

    def fake_e2e(argv):
        calls.append(argv)
        return fake

    monkeypatch.setattr(lat, "_end_to_end", fake_e2e)
    out = tmp_path / "lat.json"
    lat.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out)])
    records = json.loads(out.read_text())
    ops = [x for x in records if not x["op"].startswith("e2e/")]
    assert ops and all({"op", "baseline", "device", "shape", "median_ms", "baseline_median_ms", "speedup",
                        "threads"} <= set(x) for x in ops)
    assert all(x["threads"] == 1 for x in ops)
    e2e_rows = [x for x in records if x["op"].startswith("e2e/")]
    assert [x["op"] for x in e2e_rows] == ["e2e/speculative@0.7"] and e2e_rows[0]["steps"] == 3
    assert "--quick" in calls[0] and "threads 1" in capsys.readouterr().out
    calls.clear()
    lat.main(["--quick", "--repeats", "1", "--threads", "1", "--no-e2e"])
    assert calls == []
