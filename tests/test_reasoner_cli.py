"""``python -m dreamr``: the command line on tiny models saved to local folders."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def folders(tmp_path_factory, target_model, tok_a, draft_model, tok_b):
    root = tmp_path_factory.mktemp("models")
    paths = []
    for name, model, tok in (("target", target_model, tok_a), ("draft", draft_model, tok_b)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


def run(capsys, folders, *args):
    from dreamr.__main__ import main

    target, draft = folders
    assert main(["--target", target, "--draft", draft, "--dtype", "float64", "--max-new-tokens", "12",
                 "--max-step-tokens", "4", *args]) == 0
    return capsys.readouterr().out


def test_cli_prints_steps_metrics_and_the_weak_judge_note(capsys, folders):
    out = run(capsys, folders, "Natalia sold clips.", "--alpha", "0.5")
    assert "cpn" in out and "acceptance" in out and "tokens/s" in out
    assert "weak judges" in out


def test_cli_json_and_modes(capsys, folders):
    data = json.loads(run(capsys, folders, "--gsm8k", "0", "--json", "--mode", "target"))
    assert data["mode"] == "target" and data["steps"] and data["metrics"]["target_tokens"] == 12
    assert data["reference_answer"] == "18" and "weak judges" in data["note"]
    data = json.loads(run(capsys, folders, "Natalia sold clips.", "--json", "--alpha", "0", "--no-chat"))
    judged = [s["accepted"] for s in data["steps"] if s["accepted"] is not None]  # (None: written alone)
    assert judged and all(judged)


def test_public_import():
    import dreamr

    assert dreamr.SpeculativeReasoner.__name__ == "SpeculativeReasoner" and dreamr.ReasonerConfig
    assert {"SpeculativeReasoner", "ReasonerConfig", "StepStream", "Result", "Step"} <= set(dir(dreamr))
    assert set(dreamr.__all__) <= set(dir(dreamr))


def test_cli_mode_token_prints_the_token_level_figures(capsys, folders):
    out = run(capsys, folders, "Natalia sold clips.", "--mode", "token")
    assert "mode token" in out and "tokens per forward in written steps" in out and "mean accepted length" in out


@pytest.mark.parametrize("args,match", [(["--alpha", "2"], "alpha"), (["--mode", "fpsr", "--window", "0"], "window"),
                                        (["--dtype", "int8"], "dtype"),
                                        (["--token-speculation", "ngram+medusa"], "token_speculation"),
                                        (["--num-speculative-tokens", "0"], "num_speculative_tokens"),
                                        (["--mode", "fpsr", "--draft-policy", "never"], "--draft-policy"),
                                        (["--mode", "fpsr", "--proposal-policy", "never"], "--proposal-policy"),
                                        # the vLLM backend's flags: contradictions and an unreachable server
                                        (["--target-url", "http://127.0.0.1:9", "--target", "gemma-3-270m"], "--target"),
                                        (["--draft-url", "http://127.0.0.1:9"], "--target-url"),
                                        (["--target-url", "http://127.0.0.1:9"], "target_url"),
                                        (["--target-url", "http://127.0.0.1:9", "--alpha", "2"], "alpha")])
def test_cli_bad_settings_are_usage_errors_before_loading(capsys, monkeypatch, args, match):
    from dreamr import models
    from dreamr.__main__ import main

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["Natalia sold clips.", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err and "Traceback" not in err

