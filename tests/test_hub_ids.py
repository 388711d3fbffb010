"""Hugging Face model ids in ``dreamr.models.load`` and ``SpeculativeReasoner.from_pretrained``.

Nothing here reaches the network: each test lays out a local Hugging Face cache the way the hub client
writes it (``models--org--name/snapshots/<commit>/...`` and ``refs/main`` holding the commit) with a
tiny random model saved into it, and points ``cache_dir=`` or ``HF_HUB_CACHE`` there; the "resolves
nowhere" cases run with the hub client in offline mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

from dreamr import models
from dreamr.models import hub_id, load
from dreamr.reasoner import SpeculativeReasoner
from dreamr.testing import PROMPTS, TINY_SETTINGS

TARGET_ID = "tiny-org/tiny-llama"
DRAFT_ID = "tiny-org/tiny-qwen2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_to_hub_cache(cache: Path, repo_id: str, model, tokenizer, commit: str = COMMIT, ref: str = "main") -> Path:
    """Save ``model`` and ``tokenizer`` as the snapshot ``commit`` of ``repo_id`` in the hub cache ``cache``,
    with ``refs/<ref>`` naming it; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # the hub client writes the bare hash, no newline
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, target_model, tok_a, draft_model, tok_b):
    cache = tmp_path / "hub"
    save_to_hub_cache(cache, TARGET_ID, target_model, tok_a)
    save_to_hub_cache(cache, DRAFT_ID, draft_model, tok_b)
    return cache


@pytest.fixture
def offline(monkeypatch):
    # What HF_HUB_OFFLINE=1 sets when the hub client is imported (it is read once, at import).
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_load_reads_a_model_id_from_the_cache(hub_cache, target_model, tok_a, offline):
    loaded = load(TARGET_ID, cache_dir=hub_cache)
    assert loaded.name == TARGET_ID
    assert loaded.path == hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert loaded.source is None and not loaded.converted
    ids = tok_a.encode(PROMPTS[0])
    assert loaded.tokenizer.encode(PROMPTS[0]) == ids
    assert loaded.model.dtype == torch.float64  # the saved dtype (dtype=None)
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(target_model, ids), rtol=0, atol=0)


def test_load_finds_the_cache_through_hf_hub_cache(hub_cache, monkeypatch, offline):
    # HF_HUB_CACHE is read into huggingface_hub.constants at import; dreamr reads the constant at each call.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    loaded = load(DRAFT_ID, dtype="float32")
    assert loaded.name == DRAFT_ID and loaded.model.dtype == torch.float32
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"


def test_load_follows_the_revision(tmp_path, target_model, tok_a, same_tok_draft, offline):
    cache = tmp_path / "hub"
    save_to_hub_cache(cache, TARGET_ID, target_model, tok_a)
    other = "f" * 40
    save_to_hub_cache(cache, TARGET_ID, same_tok_draft, tok_a, commit=other, ref="small")
    assert load(TARGET_ID, cache_dir=cache).model.config.num_hidden_layers == 2  # refs/main
    by_branch = load(TARGET_ID, cache_dir=cache, revision="small")
    assert by_branch.path.name == other and by_branch.model.config.num_hidden_layers == 1
    assert load(TARGET_ID, cache_dir=cache, revision=other).model.config.num_hidden_layers == 1  # a commit
    with pytest.raises(ValueError, match=r"at revision 'v9'"):
        load(TARGET_ID, cache_dir=cache, revision="v9")


def test_from_pretrained_takes_model_ids(hub_cache, reasoner, offline):
    from_ids = SpeculativeReasoner.from_pretrained(target=TARGET_ID, draft=DRAFT_ID, cache_dir=hub_cache,
                                                   verdict_head="auto", **TINY_SETTINGS)
    assert from_ids.config.verdict_head is None  # "auto" ships heads for built-in targets only
    # an id gives what its snapshot folder given as a path gives
    snapshots = {i: hub_cache / ("models--" + i.replace("/", "--")) / "snapshots" / COMMIT for i in (TARGET_ID, DRAFT_ID)}
    from_paths = SpeculativeReasoner.from_pretrained(target=str(snapshots[TARGET_ID]), draft=str(snapshots[DRAFT_ID]),
                                                     **TINY_SETTINGS)
    for mode in ("target", "speculative"):
        got, want = from_ids.generate(PROMPTS[0], mode=mode), from_paths.generate(PROMPTS[0], mode=mode)
        assert got.metrics.num_steps > 0
        assert [(s.text, s.source, s.cpn, s.rejected_text) for s in got.steps] == \
            [(s.text, s.source, s.cpn, s.rejected_text) for s in want.steps]
    # and the target read from the cache is the model that was saved there (mode "target" runs it alone;
    # the saved draft tokenizer reloads as the Qwen2 tokenizer class, so the draft is compared by path only)
    got, want = from_ids.generate(PROMPTS[0], mode="target"), reasoner.generate(PROMPTS[0], mode="target")
    assert [s.text for s in got.steps] == [s.text for s in want.steps]


def test_from_pretrained_self_draft_from_a_model_id(hub_cache, offline):
    r = SpeculativeReasoner.from_pretrained(target=TARGET_ID, draft="self:1", cache_dir=hub_cache, **TINY_SETTINGS)
    assert isinstance(r.draft.model, models.EarlyExitDraft) and r.draft.model.num_exit_layers == 1
    assert r.generate(PROMPTS[1], mode="speculative").metrics.verified_steps > 0


@pytest.mark.parametrize("role", ["target", "draft"])
def test_an_id_found_nowhere_names_the_argument(hub_cache, role, offline):
    ids = {"target": TARGET_ID, "draft": DRAFT_ID, role: "tiny-org/not-there"}
    with pytest.raises(ValueError) as info:
        SpeculativeReasoner.from_pretrained(cache_dir=hub_cache, **ids)
    msg = str(info.value)
    assert msg.startswith(f"{role}='tiny-org/not-there' is neither a built-in model name (gemma-3-270m")
    assert str(hub_cache) in msg and "HF_HUB_OFFLINE" in msg and "hf download tiny-org/not-there" in msg


def test_an_id_missing_from_the_cache_is_downloaded_into_it(tmp_path, monkeypatch, target_model, tok_a):
    # Online, an id that is not cached goes to snapshot_download (here a stand-in that writes what the hub
    # would), asked for configs, tokenizer and safetensors only; the model then loads from the snapshot.
    import huggingface_hub

    cache, calls = tmp_path / "hub", []

    def fake_snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, cache_dir, tuple(allow_patterns)))
        return str(save_to_hub_cache(Path(cache_dir), repo_id, target_model, tok_a))

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load(TARGET_ID, cache_dir=cache)
    assert len(calls) == 1 and calls[0][:3] == (TARGET_ID, None, str(cache))
    assert "*.safetensors" in calls[0][3] and "*.bin" not in calls[0][3]  # one weight format, not both
    assert loaded.name == TARGET_ID and loaded.path.parent.parent == cache / "models--tiny-org--tiny-llama"
    load(TARGET_ID, cache_dir=cache)  # cached now: no second download
    assert len(calls) == 1


def test_a_cached_repo_without_config_is_not_a_snapshot(tmp_path, offline):
    # A repository whose cache holds other files only (a dataset-like folder) is not a model: reported as
    # not found, not a crash inside transformers.
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--weights-only" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("no config")
    (cache / "models--tiny-org--weights-only" / "refs").mkdir()
    (cache / "models--tiny-org--weights-only" / "refs" / "main").write_text(COMMIT)
    with pytest.raises(ValueError, match=r"name_or_path='tiny-org/weights-only' .* not in the local cache"):
        load("tiny-org/weights-only", cache_dir=cache)


def test_a_local_folder_comes_before_an_id_of_the_same_spelling(hub_cache, tmp_path, monkeypatch,
                                                                 same_tok_draft, tok_a, offline):
    local = tmp_path / "work" / TARGET_ID
    same_tok_draft.save_pretrained(local)
    tok_a.save_pretrained(local)
    monkeypatch.chdir(tmp_path / "work")
    loaded = load(TARGET_ID, cache_dir=hub_cache)
    assert loaded.path == Path(TARGET_ID) and loaded.model.config.num_hidden_layers == 1  # not the cached 2
    assert loaded.name == "tiny-llama"


def test_built_in_names_stay_shortcuts(hub_cache, tmp_path):
    # A built-in name never goes to the hub, whatever the cache holds under it.
    assert hub_id("gemma-3-270m") == "gemma-3-270m"  # it could be an id: the built-in table decides first
    assert models.converted_path("Gemma-3-270M") == models.converted_path("gemma-3-270m")
    for not_an_id in ("./tiny-org/x", "/abs/model", "~/m", "a/b/c", "model.gguf", "bad id", Path("org/name"), ""):
        assert hub_id(not_an_id) is None, not_an_id
    assert hub_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize("value", ["./missing/model", "a/b/c"])
def test_a_missing_path_that_is_no_id_says_so(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"nor an existing path \(nor a Hugging Face model id"):
        load(value)


def test_the_command_line_takes_model_ids_from_hf_hub_cache(hub_cache):
    # The real environment variables, read by a fresh process (the hub client reads them at import).
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dreamr", "--target", TARGET_ID, "--draft", DRAFT_ID, "--mode", "speculative",
           "--no-chat", "--json", "--max-new-tokens", "12", "--max-step-tokens", "4", "--answer-marker", "",
           "--dtype", "float64", PROMPTS[0]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["mode"] == "speculative" and out["metrics"]["verified_steps"] > 0
    missing = subprocess.run(cmd[:4] + ["tiny-org/not-there"] + cmd[5:], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2  # a usage error, no traceback
    assert "target='tiny-org/not-there'" in missing.stderr and "Traceback" not in missing.stderr
