"""Evaluation (dreamr.eval): metrics on constructed traces, a tiny end-to-end run, resume, failures."""

from __future__ import annotations

import json
import math

import pytest

from dreamr import eval as ev
from dreamr.eval import Variant, accepted_per_window, ideal_bound, make_variants, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- answer extraction: the shared extractor (dreamr.answers, used by SAPO too), smoke only ---------------------------


def test_extraction_is_the_shared_one():
    extract, match = ev.answer_functions()
    from dreamr import answers as rewards

    assert extract is rewards.extract_answer and match is rewards.answers_match
    cases = {"Janet makes 9 * 2 = 18.\n#### 18": "18", "The answer is 18.": "18", "She makes $18.00": "18",
             "It costs 1,234 dollars": "1234", "The answer is -7.": "-7", "The answer is 2.5.": "2.5",
             # fractions and scientific notation are whole numbers, not their first digits
             "The answer is 3/4.": "0.75", "#### 1e3": "1000", "The answer is 2.5E-2.": "0.025",
             "Born 3/4/2020": "2020", "48/2 = 24": "24"}
    for text, want in cases.items():
        assert extract(text) == want, text
    assert match("18", "Some solution.\n#### 18") and match("3/4", "#### 0.75") and match("1e3", "#### 1,000")
    assert not match("17", "#### 18")
    assert not match(None, "#### 18")


def test_prompts_ask_for_the_answer_format_the_extractor_reads():
    from dreamr import answers, prompts

    assert prompts.ANSWER_FORMAT.format(answer="N") in prompts.SYSTEM_PROMPT  # "... End with 'The answer is N.'"
    assert prompts.format_answer(18) == "The answer is 18." and answers.extract_answer(prompts.format_answer("1,234")) \
        == "1234"
    assert ev.SYSTEM_PROMPT is prompts.SYSTEM_PROMPT and ev.EvalSettings().answer_marker == prompts.ANSWER_MARKER
    p = ev.Problem(0, "0", "How many?", "#### 3")
    assert ev.prompt_for(p, ev.EvalSettings()) == [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                                                   {"role": "user", "content": "How many?"}]
    assert ev.prompt_for(p, ev.EvalSettings(system_prompt=None)) == [{"role": "user", "content": "How many?"}]
    assert ev.prompt_for(p, ev.EvalSettings(chat=False)) == "How many?"
    with pytest.raises(ValueError, match="answer"):
        prompts.format_answer("  ")
    with pytest.raises(ValueError, match="question"):
        prompts.chat_messages(None)


def test_prediction_is_cut_before_an_invented_question():
    extract, match = ev.answer_functions()
    rec = {"ok": True, "text": " $16.00\nQuestion: Tom has 3 apples and 5 pears.", "reference": "#### 16"}
    assert ev.score_record(dict(rec), extract, match, ("\nQuestion:",))["correct"]
    assert not ev.score_record(dict(rec), extract, match, ())["correct"]  # last number would be 5


# -- variants and data -------------------------------------------------------------------------------


def test_variants_baselines_once_verifying_modes_per_alpha():
    vs = make_variants(["target", "speculative", "draft", "fpsr"], [0.5, 0.9])
    assert [v.name for v in vs] == ["target", "speculative@0.5", "speculative@0.9", "draft", "fpsr@0.5", "fpsr@0.9"]
    assert vs[1].overrides() == {"mode": "speculative", "alpha": 0.5}
    assert vs[0].overrides() == {"mode": "target"}
    with pytest.raises(ValueError):
        make_variants([], [0.7])


def test_load_problems_field_mapping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "one?", "a": "1", "uid": "x1"}\n\n{"q": "two?", "a": "2", "uid": "x2"}\n'
                    '{"q": "three?", "a": "3", "uid": "x3"}\n')
    ps = ev.load_problems(path, fields={"question": "q", "answer": "a", "id": "uid"}, offset=1, limit=1)
    assert [(p.index, p.key, p.question, p.reference) for p in ps] == [(1, "x2", "two?", "2")]
    with pytest.raises(ValueError, match="line 1 has no question field 'question'"):
        ev.load_problems(path)


# -- metrics on constructed traces ---------------------------------------------------------------------


def test_accepted_per_window():
    assert accepted_per_window([True, True, False, True]) == (2, 3)
    assert accepted_per_window([False, False]) == (2, 0)
    assert accepted_per_window([None, True, None, True]) == (1, 2)
    assert accepted_per_window([]) == (0, 0)
    assert accepted_per_window([True] * 5, window=4) == (2, 5)
    assert accepted_per_window([True] * 4 + [False], window=4) == (2, 4)  # full window, then a rejection
    assert accepted_per_window([True, False, True, True, True, True], window=2) == (3, 5)
    with pytest.raises(ValueError):
        accepted_per_window([True], window=0)


def _m(**kw):
    base = dict(num_steps=0, verified_steps=0, accepted_steps=0, draft_tokens=0, target_tokens=0,
                committed_tokens=0, target_forward_passes=0, draft_forward_passes=0, nonfinite_verdicts=0)
    base.update(kw)
    return base


def _rec(key, variant, wall, correct, metrics, accepted=(), ok=True):
    rec = {"key": key, "variant": variant, "ok": ok, "wall_s": wall, "correct": correct, "metrics": metrics,
           "accepted": list(accepted), "finish_reason": "eos"}
    if not ok:
        rec["error"] = "RuntimeError: boom"
    return rec


def test_summary_speedup_accuracy_acceptance_and_bound():
    variants = [Variant("target"), Variant("draft"), Variant("speculative", 0.7)]
    t = _m(num_steps=4, target_tokens=20, committed_tokens=20, target_forward_passes=20)
    d = _m(num_steps=4, draft_tokens=20, committed_tokens=20, draft_forward_passes=20)
    records = [
        _rec("0", "target", 2.0, True, t), _rec("1", "target", 6.0, False, t), _rec("2", "target", 5.0, True, t),
        _rec("0", "draft", 1.0, False, d), _rec("1", "draft", 3.0, False, d), _rec("2", "draft", 9.0, False, d),
        # problem 0: T T F T -> 2 windows, 3 accepted; problem 1: F F -> 2 windows, 0 accepted
        _rec("0", "speculative@0.7", 1.0, True,
             _m(num_steps=4, verified_steps=4, accepted_steps=3, draft_tokens=20, target_tokens=5,
                committed_tokens=20, target_forward_passes=10), [True, True, False, True]),
        _rec("1", "speculative@0.7", 2.0, True,
             _m(num_steps=2, verified_steps=2, accepted_steps=0, draft_tokens=10, target_tokens=10,
                committed_tokens=10, target_forward_passes=12), [False, False]),
        _rec("2", "speculative@0.7", 0.5, False, _m(), ok=False),  # failed: out of every pairing
    ]
    s = summarize(records, variants)
    spec = s["variants"]["speculative@0.7"]
    assert spec["finished"] == 2 and spec["errors"] == 1 and spec["problems"] == 3
    assert spec["error_messages"] == {"2": "RuntimeError: boom"}
    assert spec["paired_problems"] == 2
    assert spec["speedup"] == pytest.approx((2.0 + 6.0) / (1.0 + 2.0))
    assert spec["speedup_median"] == pytest.approx(2.5)  # median of 2/1 and 6/2
    assert spec["accuracy"] == 1.0
    assert spec["accuracy_delta"] == pytest.approx(1.0 - 0.5)  # target right on 1 of the 2 paired problems
    assert spec["step_acceptance_rate"] == pytest.approx(3 / 6)
    assert spec["accepted_per_window"] == pytest.approx(3 / 4)
    # committed steps per window: (3 accepted + 3 target fallback steps) / 4 windows
    assert spec["windows"] == 4 and spec["fallback_steps"] == 3
    assert spec["mean_accepted_length"] == pytest.approx(6 / 4)
    assert spec["accuracy_all"] == pytest.approx(2 / 3)  # the failed problem counts as wrong
    assert s["variants"]["target"]["mean_accepted_length"] is None
    assert summarize(records, variants, selected=4)["variants"]["target"]["accuracy_all"] == pytest.approx(2 / 4)
    assert s["bound"]["c_source"].startswith("wall time")
    assert spec["target_passes_per_token"] == pytest.approx(22 / 30)
    assert spec["tokens_per_second"] == pytest.approx(30 / 3.0)
    assert spec["mean_draft_step_tokens"] == pytest.approx(30 / 6)
    assert s["variants"]["target"]["speedup"] == pytest.approx(1.0)
    assert s["variants"]["draft"]["speedup"] == pytest.approx(13 / 13)
    assert s["variants"]["target"]["accuracy"] == pytest.approx(2 / 3)
    # c = (13 s / 60 draft tokens) / (13 s / 60 target tokens) = 1; L = 60 / 12 = 5 -> 1 / (1 + 0.2)
    assert s["bound"]["c"] == pytest.approx(1.0)
    assert s["bound"]["L"] == pytest.approx(5.0)
    assert s["bound"]["ideal_bound"] == pytest.approx(1 / 1.2)
    assert spec["ideal_bound"] == pytest.approx(1 / (1 + 1 / 5))
    assert ideal_bound(0.25, 10) == pytest.approx(1 / 0.35)
    assert ideal_bound(None, 10) is None and ideal_bound(0.5, 0) is None


def test_summary_window_and_engine_window_counter():
    variants = [Variant("fpsr", 0.7)]
    m = _m(num_steps=6, verified_steps=6, accepted_steps=5, committed_tokens=6)
    rec = _rec("0", "fpsr@0.7", 1.0, True, m, [True] * 4 + [False] + [True])
    assert summarize([rec], variants, windows={"fpsr@0.7": 4})["variants"]["fpsr@0.7"]["accepted_per_window"] == \
        pytest.approx(5 / 3)
    # without a window cap: [T T T T F] [T] -> 2 windows from the step records
    s = summarize([rec], variants)
    row = s["variants"]["fpsr@0.7"]
    assert row["windows"] == 2 and row["fallback_steps"] == 1
    assert row["accepted_per_window"] == pytest.approx(2.5)
    assert row["mean_accepted_length"] == pytest.approx((5 + 1) / 2)
    assert row["speedup"] is None  # no target run: no speedup, no crash, but a note
    assert any("no finished 'target' runs" in n for n in s["notes"])


def test_c_falls_back_to_engine_phase_times_without_draft_and_target_runs():
    v = [Variant("speculative", 0.7)]
    m = _m(num_steps=2, verified_steps=2, accepted_steps=1, draft_tokens=10, target_tokens=5, committed_tokens=10)
    recs = [_rec("0", "speculative@0.7", 1.0, True, dict(m, draft_time_s=0.1, target_time_s=0.2), [True, False])]
    s = summarize(recs, v, same_tokenizer=False)
    assert s["bound"]["c"] == pytest.approx((0.1 / 10) / (0.2 / 5))
    assert "phase times" in s["bound"]["c_source"]
    assert s["bound"]["L"] == pytest.approx(10 / 2) and "verifying" in s["bound"]["L_source"]
    assert s["variants"]["speculative@0.7"]["ideal_bound"] == pytest.approx(1 / (0.25 + 1 / 5))
    assert any("tokenizers differ" in n for n in s["notes"])
    bare = summarize([_rec("0", "speculative@0.7", 1.0, True, m, [True, False])], v)
    assert bare["bound"]["c"] is None and bare["bound"]["c_source"] is None
    assert any("c unknown" in n for n in bare["notes"])


def test_last_record_per_pair_counts():
    v = [Variant("target")]
    recs = [_rec("0", "target", 1.0, False, _m(), ok=False), _rec("0", "target", 2.0, True, _m(committed_tokens=4))]
    row = summarize(recs, v)["variants"]["target"]
    assert row["finished"] == 1 and row["errors"] == 0 and row["wall_time_s"] == 2.0


def test_sweep_points_sorted_by_alpha():
    variants = [Variant("target"), Variant("speculative", 0.9), Variant("speculative", 0.5)]
    m = _m(num_steps=1, committed_tokens=1, verified_steps=1, accepted_steps=1)
    recs = [_rec("0", "target", 2.0, True, m), _rec("0", "speculative@0.9", 2.0, True, m, [True]),
            _rec("0", "speculative@0.5", 1.0, False, m, [True])]
    sw = ev.sweep(summarize(recs, variants))
    assert [p["alpha"] for p in sw["modes"]["speculative"]] == [0.5, 0.9]
    assert sw["modes"]["speculative"][0]["speedup"] == pytest.approx(2.0)
    assert sw["baselines"]["target"]["accuracy"] == 1.0


# -- GPU readings ----------------------------------------------------------------------------------------


def test_gpu_monitor_without_gpu(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    mon = ev.GpuMonitor()
    mon.sample()
    s = mon.summary()
    assert s["gpu"] == "no GPU" and "NVML" in s["reason"]
    env = ev.environment(None, mon)
    assert env["gpu"]["gpu"] == "no GPU" and env["versions"]["torch"]


def test_gpu_monitor_without_nvml_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    mon = ev.GpuMonitor()
    mon.start()
    assert not mon.running  # nothing to sample: no thread
    mon.stop()
    s = mon.summary()
    assert s["gpu"] == "nvidia-ml-py not installed" and "pip install nvidia-ml-py" in s["reason"]


def test_gpu_monitor_samples_in_a_background_thread():
    import threading
    import time

    calls = []
    threads = set()

    def fake():
        calls.append(1)
        threads.add(threading.current_thread().name)
        return [{"memory_used_mib": 100.0 + len(calls), "power_w": 50.0}]

    mon = ev.GpuMonitor(interval=0.01, sampler=fake)
    assert len(calls) == 1  # one reading at construction
    with mon:
        assert mon.running
        deadline = time.monotonic() + 5
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not mon.running
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n  # stopped: no more readings
    assert "dreamr-gpu-monitor" in threads
    g = mon.summary()["gpus"][0]
    assert g["samples"] == n >= 5 and g["power_w_mean"] == pytest.approx(50.0)
    assert g["memory_used_mib_max"] == pytest.approx(100.0 + n)

    def broken():
        raise RuntimeError("sensor gone")

    bad = ev.GpuMonitor(interval=0.01, sampler=broken)  # a failing reading never raises
    bad.start()
    bad.stop()
    assert "sensor gone" in bad.summary()["last_error"]
    with pytest.raises(ValueError, match="interval"):
        ev.GpuMonitor(interval=0)


# -- a small evaluation on tiny random models -------------------------------------------------------------

QUESTIONS = [("Natalia sold 48 clips in April.", "#### 48"), ("Step 1: 2 + 2 = 4.", "#### 4"),
             ("How many clips altogether?", "#### 72"), ("Is the last step correct?", "#### 1"),
             ("She sold half as many in May.", "#### 24")]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


class Proxy:
    """The reasoner with a counter of generate calls, an optional interruption and optional failures."""

    def __init__(self, inner, interrupt_after=None, fail_on=None):
        self.inner, self.calls, self.interrupt_after, self.fail_on = inner, [], interrupt_after, fail_on
        self.target, self.draft, self.config = inner.target, inner.draft, inner.config

    def __getattr__(self, name):  # the rest of the reasoner (its config builder, verifiers, thresholds)
        return getattr(self.inner, name)

    def generate(self, prompt, **kw):
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((question, kw["mode"], kw.get("alpha")))
        if self.fail_on is not None and self.fail_on in question and kw["mode"] == "speculative":
            raise RuntimeError("simulated failure")
        return self.inner.generate(prompt, **kw)


KW = dict(modes=["target", "draft", "speculative"], alphas=[0.0, 1.0], max_new_tokens=12, max_step_tokens=4,
          warmup=False, progress=False, system_prompt=None)


def test_small_evaluation_writes_json_and_png_and_resumes(reasoner, data, tmp_path):
    out = tmp_path / "run"
    n_var = 4  # target, draft, speculative@0, speculative@1
    first = Proxy(reasoner, interrupt_after=2 * n_var + 1)  # problems 0 and 1 whole, one run of problem 2
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(first, data, out, **KW)
    done = ev.read_records(out / ev.RECORDS)
    assert len(done) == 2 * n_var + 1
    # interleaved per problem, the variant order rotating by one per problem
    assert [r["variant"] for r in done[:n_var]] == ["target", "draft", "speculative@0", "speculative@1"]
    assert [r["variant"] for r in done[n_var:2 * n_var]] == ["draft", "speculative@0", "speculative@1", "target"]

    second = Proxy(reasoner)
    report = ev.evaluate(second, data, out, **KW)
    assert len(second.calls) == len(QUESTIONS) * n_var - len(done)  # nothing finished is run again
    finished = {(QUESTIONS[int(r["key"])][0], r["variant"]) for r in done}
    rerun = {(q, mode if alpha is None else f"{mode}@{alpha:g}") for q, mode, alpha in second.calls}
    assert not finished & rerun
    records = ev.read_records(out / ev.RECORDS)
    assert len(records) == len(QUESTIONS) * n_var
    assert len({(r["key"], r["variant"]) for r in records}) == len(records)

    results = json.loads((out / ev.RESULTS).read_text())
    assert results == json.loads(json.dumps(report))
    for key in ("summary", "sweep", "settings", "models", "environment", "dataset", "seed", "files"):
        assert key in results
    assert results["environment"]["gpu"]  # "no GPU" here, readings on a GPU machine
    assert results["models"]["target"]["class"] == "LlamaForCausalLM"
    rows = results["summary"]["variants"]
    assert set(rows) == {"target", "draft", "speculative@0", "speculative@1"}
    for row in rows.values():
        assert row["finished"] == len(QUESTIONS) and row["errors"] == 0
        assert row["speedup"] is not None and row["accuracy"] is not None and row["tokens_per_second"] > 0
    assert rows["target"]["speedup"] == pytest.approx(1.0)
    assert rows["speculative@0"]["step_acceptance_rate"] == 1.0  # alpha 0: every finite verdict accepts
    assert rows["speculative@1"]["step_acceptance_rate"] == 0.0  # alpha 1: none
    assert rows["speculative@1"]["target_tokens"] == rows["target"]["target_tokens"]  # exactly target's text
    assert rows["draft"]["step_acceptance_rate"] is None
    assert math.isfinite(results["summary"]["bound"]["c"])
    sweep = json.loads((out / ev.SWEEP_JSON).read_text())
    assert [p["alpha"] for p in sweep["modes"]["speculative"]] == [0.0, 1.0]
    assert (out / ev.SWEEP_PNG).read_bytes()[:8] == PNG_MAGIC
    assert "speculative@1" in ev.format_table(report)

    third = Proxy(reasoner)  # all done: nothing runs, the report is rebuilt
    ev.evaluate(third, data, out, **KW)
    assert third.calls == []
    with pytest.raises(ValueError, match="other settings"):
        ev.evaluate(third, data, out, **{**KW, "max_new_tokens": 13})


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
def test_failing_problem_is_recorded_and_the_run_goes_on(reasoner, data, tmp_path):
    out = tmp_path / "run"
    proxy = Proxy(reasoner, fail_on="How many clips")
    kw = {**KW, "modes": ["target", "speculative"], "alphas": [0.5], "limit": 3}
    report = ev.evaluate(proxy, data, out, **kw, plot=False)
    bad = [r for r in ev.read_records(out / ev.RECORDS) if not r["ok"]]
    assert len(bad) == 1 and bad[0]["key"] == "2" and bad[0]["variant"] == "speculative@0.5"
    assert bad[0]["error"] == "RuntimeError: simulated failure" and "Traceback" in bad[0]["traceback"]
    row = report["summary"]["variants"]["speculative@0.5"]
    assert row["finished"] == 2 and row["errors"] == 1 and row["paired_problems"] == 2
    assert row["error_messages"] == {"2": "RuntimeError: simulated failure"}
    assert not (out / ev.SWEEP_PNG).exists()
    # resume: recorded failures are kept, unless retry_failed
    again = Proxy(reasoner)
    ev.evaluate(again, data, out, **kw, plot=False)
    assert again.calls == []
    retry = Proxy(reasoner)
    report = ev.evaluate(retry, data, out, **kw, plot=False, retry_failed=True)
    assert len(retry.calls) == 1 and report["summary"]["variants"]["speculative@0.5"]["errors"] == 0


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
def test_chat_prompt_and_plain_prompt(reasoner, data, tmp_path):
    proxy = Proxy(reasoner)
    ev.evaluate(proxy, data, tmp_path / "a", **{**KW, "modes": ["draft"], "limit": 1, "system_prompt": "Be brief."},
                plot=False)
    plain = Proxy(reasoner)
    ev.evaluate(plain, data, tmp_path / "b", **{**KW, "modes": ["draft"], "limit": 1, "chat": False}, plot=False)
    assert proxy.calls[0][0] == plain.calls[0][0] == QUESTIONS[0][0]


def test_engine_phase_timings_are_summed_when_reported():
    v = [Variant("speculative", 0.7)]
    m = _m(num_steps=1, committed_tokens=1, verified_steps=1, accepted_steps=1)
    recs = [_rec("0", "speculative@0.7", 1.0, True, dict(m, draft_time_s=0.25, verify_time_s=0.5, wall_time_s=1.0)),
            _rec("1", "speculative@0.7", 1.0, True, dict(m, draft_time_s=0.25, verify_time_s=0.25))]
    row = summarize(recs, v)["variants"]["speculative@0.7"]
    assert row["phase_time_s"] == {"draft_time_s": 0.5, "verify_time_s": 0.75}
    assert summarize(recs[:1], [Variant("speculative", 0.7)])["variants"]["speculative@0.7"]["phase_time_s"]
    assert summarize([_rec("0", "target", 1.0, True, _m())], [Variant("target")])["variants"]["target"][
        "phase_time_s"] is None


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
def test_resume_after_a_torn_last_line(reasoner, data, tmp_path):
    out = tmp_path / "run"
    kw = {**KW, "modes": ["draft"], "limit": 3}
    ev.evaluate(Proxy(reasoner), data, out, **kw, plot=False)
    path = out / ev.RECORDS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed while writing
    proxy = Proxy(reasoner)
    report = ev.evaluate(proxy, data, out, **kw, plot=False)
    assert len(proxy.calls) == 1  # only the torn record is run again
    assert report["summary"]["variants"]["draft"]["finished"] == 3
    assert len(ev.read_records(path)) == 3


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
@pytest.mark.slow
def test_cli_on_the_real_pair(tmp_path, capsys):
    """python bench/eval.py on one GSM8K problem with the default pair (a minute on CPU)."""
    out = tmp_path / "real"
    assert ev.main(["--limit", "1", "--modes", "target", "speculative", "--alphas", "0.7", "--max-new-tokens", "16",
                    "--max-step-tokens", "8", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / ev.RESULTS).read_text())
    assert results["models"]["names"]["target"] == "gemma-3-270m"
    assert results["summary"]["variants"]["speculative@0.7"]["finished"] == 1
    assert (out / ev.SWEEP_PNG).read_bytes()[:8] == PNG_MAGIC
    assert "speculative@0.7" in capsys.readouterr().out


# -- bad input is rejected before any work ------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (dict(modes=["target", "speculatve"]), "unknown mode 'speculatve'"),
    (dict(alphas=[1.5]), "alphas must be a number in \\[0, 1\\].*1.5"),
    (dict(alphas=[float("nan")]), "alphas must be a number in \\[0, 1\\].*nan"),
    (dict(extra={"windw": 4}), "unknown setting.*windw"),
    (dict(extra={"window": 0}), "window must be an integer >= 1"),
    (dict(modes="speculatve"), "unknown mode"),
    (dict(extra={"alpha": 0.5}), "set per variant"),
    (dict(extra={"calibrate": True}), "set per variant"),
    (dict(modes=["speculative@0.5+target_acceptance=0.5"]), "apply to alpha='auto' only"),
    (dict(modes=["speculative@0.5+calibrat"]), "unknown verifier option 'calibrat'"),
    (dict(modes=["target@0.5"]), "does not verify"),
    (dict(modes=["speculative@1.5"]), "alpha must be a number in \\[0, 1\\].*1.5"),
    (dict(alphas=["auto"], verifiers=["target_acceptance=1.0"]), "target_acceptance must be a number in \\(0, 1\\)"),
    (dict(alphas=["sometimes"]), "alphas must be a number in \\[0, 1\\] or 'auto'"),
    (dict(modes=["speculative@0.5+verdict_head=/nonexistent/head"]), "verdict_head.*not a verdict head folder"),
])
def test_bad_settings_raise_before_any_work(reasoner, data, tmp_path, bad, message):
    proxy = Proxy(reasoner)
    with pytest.raises(ValueError, match=message):
        ev.evaluate(proxy, data, tmp_path / "run", **{**KW, "warmup": True, **bad})
    assert proxy.calls == [] and not (tmp_path / "run").exists()


def test_a_single_mode_string_is_one_mode(reasoner, data, tmp_path):
    proxy = Proxy(reasoner)
    report = ev.evaluate(proxy, data, tmp_path / "run", **{**KW, "modes": "target", "limit": 1}, plot=False)
    assert list(report["summary"]["variants"]) == ["target"]
    assert report["settings"]["modes"] == ["target"] and [c[1] for c in proxy.calls] == ["target"]
    assert make_variants("speculative", 0.5) == [Variant("speculative", 0.5)]


def test_missing_baselines_warn(reasoner, data, tmp_path):
    with pytest.warns(RuntimeWarning) as caught:
        report = ev.evaluate(Proxy(reasoner), data, tmp_path / "run",
                             **{**KW, "modes": ["speculative"], "alphas": [0.5], "limit": 1}, plot=False)
    messages = [str(w.message) for w in caught]
    assert any("no 'target' mode" in m for m in messages) and any("no 'draft' mode" in m for m in messages)
    row = report["summary"]["variants"]["speculative@0.5"]
    assert row["speedup"] is None and row["accuracy_delta"] is None
    assert report["summary"]["bound"]["c_source"] is None or "phase times" in report["summary"]["bound"]["c_source"]


def test_results_json_survives_a_missing_matplotlib(reasoner, data, tmp_path, monkeypatch):
    def no_matplotlib(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(ev.report, "plot_sweep", no_matplotlib)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="pip install matplotlib"):
        report = ev.evaluate(Proxy(reasoner), data, out, **{**KW, "modes": ["target"], "limit": 1})
    results = json.loads((out / ev.RESULTS).read_text())
    assert results["summary"]["variants"]["target"]["finished"] == 1 and "sweep_png" not in report["files"]
    assert not (out / ev.SWEEP_PNG).exists()


def _no_models(monkeypatch):
    from dreamr.reasoner import SpeculativeReasoner

    def fail(*args, **kwargs):
        raise AssertionError("models must not be loaded")

    monkeypatch.setattr(SpeculativeReasoner, "from_pretrained", staticmethod(fail))


@pytest.mark.parametrize("args, message", [
    (["--modes", "targt"], "unknown mode 'targt'"),
    (["--alphas", "1.5"], "alphas must be a number"),
    (["--alphas", "nan"], "alphas must be a number"),
    (["--set", "windw=4"], "unknown setting"),
    (["--set", "window"], "expected NAME=VALUE"),
    (["--question-field", "q"], "no question field 'q'"),
    (["--data", "/nonexistent/x.jsonl"], "no such file"),
    (["--offset", "99"], "no problems selected"),
    (["--alphas", "autox"], "expected a number in \\[0, 1\\] or 'auto'"),
    (["--verifiers", "calibrat"], "unknown verifier option 'calibrat'"),
    (["--modes", "speculative@0.7+target_acceptance=0.4"], "apply to alpha='auto' only"),
])
def test_cli_rejects_bad_input_before_loading_models(data, tmp_path, monkeypatch, capsys, args, message):
    _no_models(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        ev.main(["--data", str(data), "--out", str(tmp_path / "o"), "--no-progress", *args])
    assert exc.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
def test_cli_fails_when_a_variant_finished_nothing(reasoner, data, tmp_path, monkeypatch, capsys):
    from dreamr.reasoner import SpeculativeReasoner

    proxy = Proxy(reasoner, fail_on="")  # every speculative run raises
    monkeypatch.setattr(SpeculativeReasoner, "from_pretrained", staticmethod(lambda **kw: proxy))
    argv = ["--data", str(data), "--out", str(tmp_path / "o"), "--modes", "target", "speculative", "--alphas", "0.5",
            "--limit", "2", "--max-new-tokens", "12", "--max-step-tokens", "4", "--no-progress", "--no-plot",
            "--no-warmup"]
    assert ev.main(argv) == 1
    assert "variant speculative@0.5 finished no problem" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / ev.RESULTS).read_text())["summary"]["variants"]["target"]["finished"] == 2
    monkeypatch.setattr(SpeculativeReasoner, "from_pretrained", staticmethod(lambda **kw: Proxy(reasoner)))
    assert ev.main(argv + ["--retry-failed"]) == 0


# -- verifier variants: a verdict head, calibration and alpha="auto" beside fixed alphas (issue 15) -----------


def test_variant_specs_name_the_verifier_and_cross_alphas_and_verifiers():
    vs = make_variants(["target", "speculative", "fpsr@0.5+calibrate+verdict_head=none"], [0.7, "auto"],
                       ["default", "calibrate", "target_acceptance=0.3"])
    assert [v.name for v in vs] == [
        "target", "speculative@0.7", "speculative@0.7+calibrate", "speculative@auto", "speculative@auto+calibrate",
        "speculative@auto+target_acceptance=0.3",  # an auto-only option is crossed with the auto alpha only
        "fpsr@0.5+verdict_head=none+calibrate"]  # its own options, in canonical order; not crossed
    assert vs[-1].overrides() == {"mode": "fpsr", "alpha": 0.5, "verdict_head": None, "calibrate": True}
    assert vs[5].overrides() == {"mode": "speculative", "alpha": "auto", "target_acceptance": 0.3}
    assert vs[5].auto and not vs[1].auto and vs[2].series == "speculative+calibrate"
    assert ev.parse_verifier("verdict_head=runs/h+calibrate=false") == (("verdict_head", "runs/h"), ("calibrate", False))
    with pytest.raises(ValueError, match="given twice"):
        ev.parse_verifier("calibrate+calibrate=false")
    with pytest.raises(ValueError, match="target_acceptance"):
        make_variants(["speculative"], [0.7], ["target_acceptance=0.5"])  # no auto alpha to apply it to


def test_sweep_keeps_verifier_series_and_auto_variants_apart():
    cal = (("calibrate", True),)
    variants = [Variant("target"), Variant("speculative", 0.5), Variant("speculative", 0.5, cal),
                Variant("speculative", 0.9, cal), Variant("speculative", "auto")]
    m = _m(num_steps=2, committed_tokens=2, verified_steps=2, accepted_steps=1)
    auto_m = [dict(m, alpha_sum=1.0, alpha_final=0.45), dict(m, alpha_sum=0.8, alpha_final=0.35)]
    recs = [_rec("0", "target", 2.0, True, m), _rec("1", "target", 2.0, True, m),
            _rec("0", "speculative@0.5", 1.0, True, m, [True, False]),
            _rec("0", "speculative@0.5+calibrate", 1.0, True, m, [True, False]),
            _rec("0", "speculative@0.9+calibrate", 1.0, True, m, [True, False]),
            _rec("1", "speculative@auto", 1.0, True, auto_m[1], [True, False]),  # run first
            _rec("0", "speculative@auto", 1.0, True, auto_m[0], [False, True])]  # run last: its alpha is final
    s = summarize(recs, variants, verifiers={"speculative@auto": {"label": "yes/no auto->0.5",
                                                                  "target_acceptance": 0.5}})
    row = s["variants"]["speculative@auto"]
    assert row["alpha_mean"] == pytest.approx(1.8 / 4) and row["alpha_final"] == 0.45
    assert row["target_acceptance"] == 0.5 and row["acceptance_gap"] == pytest.approx(0.5 - 0.5)
    assert row["verifier"] == "yes/no auto->0.5" and s["variants"]["speculative@0.5"]["verifier"] is None
    sw = ev.sweep(s)
    assert set(sw["modes"]) == {"speculative", "speculative+calibrate"}
    assert [p["alpha"] for p in sw["modes"]["speculative+calibrate"]] == [0.5, 0.9]
    assert list(sw["auto"]) == ["speculative@auto"] and sw["auto"]["speculative@auto"]["alpha_mean"] == \
        pytest.approx(0.45)


def test_alpha_trajectory_follows_run_order_and_the_last_record_per_problem():
    v = [Variant("speculative", "auto", (("target_acceptance", 0.25),)), Variant("speculative", 0.5)]
    name = v[0].name
    recs = [{"key": "0", "variant": name, "ok": True, "alphas": [0.5, 0.6], "accepted": [True, True]},
            {"key": "1", "variant": name, "ok": False},  # failed, then retried below
            {"key": "0", "variant": "speculative@0.5", "ok": True, "alphas": [0.5], "accepted": [True]},
            {"key": "1", "variant": name, "ok": True, "alphas": [None, 0.7, 0.4], "accepted": [None, False, True]}]
    t = ev.alpha_trajectories(recs, v)
    assert list(t) == [name]  # fixed-alpha variants have no trajectory
    assert t[name]["alpha"] == [0.5, 0.6, 0.7, 0.4] and t[name]["accepted"] == [True, True, False, True]
    assert t[name]["acceptance"] == pytest.approx([1.0, 1.0, 2 / 3, 3 / 4])
    assert t[name]["target_acceptance"] == 0.25 and t[name]["steps"] == 4
    assert ev.alpha_trajectories(recs, v[1:]) == {}


def _tiny_head(model, tokenizer, folder, *, calibrated: bool, seed: int = 0):
    """A random verdict head made for ``model`` (its identity and verdict template), saved to ``folder``."""
    import torch

    from dreamr.verify import StepVerifier, VerdictHead
    from dreamr.verify.head import target_identity

    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    head = VerdictHead(torch.randn(2, hidden, generator=g, dtype=torch.float32),
                       torch.randn(2, generator=g, dtype=torch.float32), calibrated=calibrated)
    head.meta.update(target=target_identity(model, "tiny"), template=StepVerifier(model, tokenizer).template)
    return head.save(folder)


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
def test_evaluation_runs_head_calibration_and_auto_alpha_beside_fixed_alpha(reasoner, data, tmp_path):
    folder = _tiny_head(reasoner.target.model, reasoner.target.tokenizer, tmp_path / "head", calibrated=False)
    head = f"verdict_head={folder}"
    out = tmp_path / "run"
    modes = ["target", "speculative", f"speculative@0+{head}", "speculative@auto+target_acceptance=0.5"]
    proxy = Proxy(reasoner)
    report = ev.evaluate(proxy, data, out, **{**KW, "modes": modes, "alphas": [0.0], "verifiers": ["", "calibrate"],
                                              "limit": 3, "max_new_tokens": 16, "warmup": True})
    rows = report["summary"]["variants"]
    names = ["target", "speculative@0", "speculative@0+calibrate", f"speculative@0+{head}",
             "speculative@auto+target_acceptance=0.5"]
    assert list(rows) == names
    # each variant's calls carried its verifier options to generate
    assert {(q, m, a) for q, m, a in proxy.calls if a == "auto"} and all(r["finished"] == 3 for r in rows.values())
    ver = report["verifiers"]
    assert "target" not in ver
    assert ver["speculative@0"]["label"] == "yes/no alpha=0" and not ver["speculative@0"]["calibrate"]
    assert ver["speculative@0+calibrate"]["label"] == "yes/no+cal alpha=0"
    assert ver[f"speculative@0+{head}"]["label"] == "head:tiny alpha=0"
    assert ver[f"speculative@0+{head}"]["verdict_head"] == str(folder)
    auto = ver["speculative@auto+target_acceptance=0.5"]
    assert auto["label"] == "yes/no auto->0.5" and auto["alpha"] == "auto" and auto["target_acceptance"] == 0.5
    table = ev.format_table(report)
    for name in names[1:]:
        line = next(ln for ln in table.splitlines() if ln.startswith(name + " "))
        assert line.rstrip().endswith(ver[name]["label"])  # the table says which verifier each variant used
    # the verifier options reach the verifier: the same drafted first step gets other verdicts
    recs = {(r["key"], r["variant"]): r for r in ev.read_records(out / ev.RECORDS)}
    first = {name: [recs[(k, name)]["cpn"][0] for k in "012"] for name in names[1:4]}
    assert first["speculative@0"] != first["speculative@0+calibrate"]
    assert first["speculative@0"] != first[f"speculative@0+{head}"]
    assert all(recs[(k, "speculative@0+calibrate")]["verifier"] == ver["speculative@0+calibrate"]["id"] for k in "012")
    # alpha="auto": one threshold carried across the problems in run order, started afresh by the evaluation
    # (after the warm-up, which judged a step with it)
    name = "speculative@auto+target_acceptance=0.5"
    traj = report["alpha"][name]
    assert traj == json.loads((out / ev.ALPHA_JSON).read_text())[name]
    alphas, flags = traj["alpha"], traj["accepted"]
    assert traj["steps"] == len(alphas) >= 3 and alphas[0] == pytest.approx(0.5)
    gamma = reasoner.config.alpha_gamma
    for t in range(len(alphas) - 1):  # alpha_{t+1} = clip(alpha_t + gamma * (accepted_t - 0.5), 0, 1)
        assert alphas[t + 1] == pytest.approx(min(1.0, max(0.0, alphas[t] + gamma * (flags[t] - 0.5))))
    assert rows[name]["alpha_mean"] == pytest.approx(sum(alphas) / len(alphas))
    assert rows[name]["alpha_final"] == pytest.approx(alphas[-1])
    assert rows[name]["step_acceptance_rate"] == pytest.approx(sum(flags) / len(flags))
    assert rows["speculative@0"]["alpha_mean"] == 0.0 and rows["speculative@0"]["alpha_final"] == 0.0
    assert (out / ev.ALPHA_PNG).read_bytes()[:8] == PNG_MAGIC
    assert (out / ev.SWEEP_PNG).read_bytes()[:8] == PNG_MAGIC
    assert list(report["sweep"]["auto"]) == [name]
    assert any(ln.startswith(f"alpha=auto {name}: acceptance") for ln in table.splitlines())


@pytest.mark.filterwarnings("ignore:no '(target|draft)' mode in modes:RuntimeWarning")  # runs without a baseline on purpose
def test_a_resume_refuses_records_of_another_verifier(reasoner, data, tmp_path):
    out = tmp_path / "run"
    kw = {**KW, "modes": ["target", "speculative@0.5"], "limit": 1}
    ev.evaluate(Proxy(reasoner), data, out, **kw, plot=False)
    path = out / ev.RECORDS
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    for rec in lines:
        if rec["variant"] == "speculative@0.5":
            rec["verifier"] = "head:other alpha=0.5 /somewhere/else"  # as if run with another default head
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match="variant speculative@0.5 was run with verifier"):
        ev.evaluate(Proxy(reasoner), data, out, **kw, plot=False)


def test_a_head_for_another_target_is_refused_before_any_work(reasoner, data, tmp_path, tok_a):
    from dreamr.testing import tiny_llama

    folder = _tiny_head(tiny_llama(tok_a, seed=5), tok_a, tmp_path / "other", calibrated=False)
    proxy = Proxy(reasoner)
    with pytest.raises(ValueError, match="verdict_head"):
        ev.evaluate(proxy, data, tmp_path / "run", **{**KW, "modes": [f"speculative@0.5+verdict_head={folder}"]})
    assert proxy.calls == [] and not (tmp_path / "run").exists()


# -- the library never imports its harnesses; the benchmarks reuse evaluation ---------------------------------


def test_no_module_of_dreamr_imports_training_bench_or_tests():
    import ast
    from pathlib import Path

    import dreamr

    harnesses = {"training", "bench", "tests"}
    found = []
    for path in Path(dreamr.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            # importlib.import_module("training...") / sys.path tricks: a string naming a harness package
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("import_module", "spec_from_file_location"):
                names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0].split("/")[0] in harnesses]
    assert found == []


def _bench(name, monkeypatch):
    """A benchmark script as a module (registered in sys.modules while the test runs: its dataclasses
    resolve their annotations there)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_build_their_runs_from_evaluation(reasoner, data, monkeypatch):
    import argparse

    fpsr = _bench("e2e_fpsr", monkeypatch)
    args = argparse.Namespace(which="real", alpha=0.5, fpsr_variants=["target_launch=eager"])
    configs = fpsr.variants(args)
    assert [v.name for v in configs] == ["target", "speculative", "fpsr", "fpsr[target_launch=eager]"]
    assert isinstance(configs[1], Variant) and configs[1].overrides() == {"mode": "speculative", "alpha": 0.5}
    settings = ev.EvalSettings(limit=2, max_new_tokens=12, max_step_tokens=4, system_prompt=None)
    problems = ev.select_problems(data, settings)
    records = fpsr.run_modes(reasoner, problems, settings, configs[:2])
    assert [(r["key"], r["variant"]) for r in records] == [("0", "target"), ("0", "speculative"),
                                                           ("1", "speculative"), ("1", "target")]  # interleaved
    rows = fpsr.summarize(records, configs[:2])
    assert rows["target"]["speedup_vs_target"] == pytest.approx(1.0)
    assert rows["speculative"]["tokens"] == sum(r["metrics"]["committed_tokens"] for r in records
                                                if r["variant"] == "speculative")
    vlm = _bench("vlm_latency", monkeypatch)
    assert [v.name for v in vlm.parse_args(["--modes", "target", "speculative", "fpsr@1"]).variants] == \
        ["target", "speculative@0.7", "fpsr@1"]
    with pytest.raises(SystemExit):
        vlm.parse_args(["--modes", "speculative:0.5"])  # the old mode:alpha form is not a variant spec
