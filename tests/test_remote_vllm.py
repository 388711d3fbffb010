"""dreamr over real vLLM CPU servers (gemma-3-270m target, SmolLM2-135M-Instruct draft): slow tests.

The servers come from the session fixture ``vllm_pair`` (tests/conftest.py), or, to run these against servers
already up, from ``DREAMR_TEST_VLLM_URLS=target_url,draft_url``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

import httpx
import pytest

from dreamr.backends.vllm import ServerError
from dreamr.prompts import chat_messages
from dreamr.remote import RemoteReasoner

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
    "clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she "
    "earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
    "parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How "
    "much more money does Betty need to buy the wallet?",
]
PROMPTS = [chat_messages(q) for q in QUESTIONS]
SETTINGS = dict(max_new_tokens=96, max_step_tokens=40)


@pytest.fixture(scope="module")
def urls(request):
    given = os.environ.get("DREAMR_TEST_VLLM_URLS")
    if given:
        target, draft = given.split(",")
        return target, draft
    target, draft = request.getfixturevalue("vllm_pair")
    return target.url, draft.url


@pytest.fixture(scope="module")
def reasoner(urls):
    return RemoteReasoner(*urls, **SETTINGS)


def _steps(result):
    return [(s.text, s.source) for s in result.steps]


def _cpn_from_server(url: str, model: str, ids: list[int], positive: list[int], negative: list[int]) -> float:
    """cpn computed here, independently, from the target server's log-probabilities after ``ids``."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1,
            "logprob_token_ids": positive + negative, "return_tokens_as_token_ids": True}
    top = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    lp = {int(k.split(":")[1]): v for k, v in top.items()}

    def lse(xs):
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    return 1.0 / (1.0 + math.exp(-(lse([lp[t] for t in positive]) - lse([lp[t] for t in negative]))))


def test_target_mode_is_the_target_servers_greedy_text(reasoner, urls):
    committed = {}
    reasoner.observer = lambda t_ids, d_ids: committed.update(ids=list(t_ids))
    try:
        result = reasoner.generate(PROMPTS[0], mode="target")
    finally:
        reasoner.observer = None
    prompt_ids = reasoner.target.encode_prompt(PROMPTS[0])
    generated = committed["ids"][len(prompt_ids):]
    assert result.steps and all(s.source == "target" and s.cpn is None for s in result.steps)
    # one plain greedy completion of the same length, without any stop string: the same tokens
    body = {"model": reasoner.target.served_name, "prompt": prompt_ids, "max_tokens": len(generated),
            "temperature": 0, "return_token_ids": True}
    whole = httpx.post(f"{urls[0]}/v1/completions", json=body, timeout=300).json()["choices"][0]["token_ids"]
    assert whole[:len(generated)] == generated
    assert result.text == "".join(s.text for s in result.steps)
    assert result.metrics.target_requests >= len(result.steps)


def test_alpha_one_is_the_target_and_alpha_zero_the_draft(reasoner):
    for prompt in PROMPTS[1:2]:
        target = reasoner.generate(prompt, mode="target")
        at_one = reasoner.generate(prompt, mode="speculative", alpha=1.0)
        assert _steps(at_one) == _steps(target)
        assert all(s.accepted is False and s.rejected_text for s in at_one.steps)
        draft = reasoner.generate(prompt, mode="draft")
        at_zero = reasoner.generate(prompt, mode="speculative", alpha=0.0)
        assert [s.text for s in at_zero.steps] == [s.text for s in draft.steps]
        assert all(s.source == "draft" and s.accepted for s in at_zero.steps)


def test_fpsr_commits_the_steps_of_speculative_for_many_requests_at_once(reasoner):
    alpha = 0.8  # between these judges' verdicts on these problems: some steps pass, some do not
    speculative = reasoner.generate_batch(PROMPTS, mode="speculative", alpha=alpha)
    fpsr = reasoner.generate_batch(PROMPTS, mode="fpsr", alpha=alpha, window=3)
    reasoner.fpsr_target_launch = "on_reject"
    try:
        on_reject = reasoner.generate_batch(PROMPTS, mode="fpsr", alpha=alpha, window=2)
    finally:
        reasoner.fpsr_target_launch = "eager"
    verdicts = [s.accepted for r in speculative for s in r.steps]
    assert True in verdicts and False in verdicts, f"alpha {alpha} no longer splits the verdicts: {verdicts}"
    for s_res, f_res in [*zip(speculative, fpsr), *zip(speculative, on_reject)]:
        assert [(s.text, s.source, s.accepted, s.rejected_text) for s in f_res.steps] == \
               [(s.text, s.source, s.accepted, s.rejected_text) for s in s_res.steps]
        # the same requests, batched differently on the server: equal up to the batch's rounding
        assert [s.cpn for s in f_res.steps] == pytest.approx([s.cpn for s in s_res.steps], abs=2e-3)
        assert f_res.finish_reason == s_res.finish_reason and f_res.mode == "fpsr"
    assert sum(r.metrics.cancelled_requests for r in fpsr) > 0  # work past a verdict was aborted
    assert [r.metrics.target_tokens for r in on_reject] == [r.metrics.target_tokens for r in speculative]
    # a request alone gives what it gave in the batch
    alone = reasoner.generate(PROMPTS[1], mode="speculative", alpha=alpha)
    assert _steps(alone) == _steps(speculative[1])


@pytest.mark.parametrize("calibrate", [False, True])
def test_every_cpn_is_the_one_from_the_servers_logprobs(reasoner, urls, calibrate):
    prefixes = [reasoner.target.encode_prompt(PROMPTS[2])]
    reasoner.observer = lambda t_ids, d_ids: prefixes.append(list(t_ids))
    try:
        result = reasoner.generate(PROMPTS[2], mode="speculative", alpha=0.8, calibrate=calibrate)
    finally:
        reasoner.observer = None
    prompt = reasoner._verifier(reasoner.config).prompt
    positive, negative = (list(ids) for ids in prompt.verdict_ids)
    model = reasoner.target.served_name
    assert result.metrics.verified_steps == len(result.steps) > 0
    for k, step in enumerate(result.steps):
        drafted = step.text if step.accepted else step.rejected_text
        ids = prefixes[k] + reasoner.target.encode_text(drafted) + prompt.suffix_ids(drafted)
        expected = _cpn_from_server(urls[0], model, ids, positive, negative)
        if calibrate:
            null = _cpn_from_server(urls[0], model, prefixes[k] + prompt.null_ids(), positive, negative)
            margin = math.log(expected / (1 - expected)) - math.log(null / (1 - null))
            expected = 1.0 / (1.0 + math.exp(-margin))
        assert step.cpn == pytest.approx(expected, abs=1e-5)
        assert step.accepted == (step.cpn > 0.8)


def test_streaming_and_the_servers_own_figures(reasoner):
    async def run():
        stream = reasoner.astream(PROMPTS[0], mode="speculative", alpha=0.8)
        steps = [step async for step in stream]
        figures = await reasoner.server_metrics()
        await reasoner.aclose()
        return stream.result, steps, figures

    result, steps, figures = asyncio.run(run())
    assert steps == result.steps
    assert figures["target"]["vllm:prefix_cache_hits_total"] > 0  # verdicts and fallbacks reuse the prefix
    assert figures["draft"]["vllm:generation_tokens_total"] > 0


def test_bad_input_names_the_argument(urls, reasoner):
    target_url, draft_url = urls
    with pytest.raises(ValueError, match="target_url"):
        RemoteReasoner("http://127.0.0.1:9", draft_url)
    with pytest.raises(ValueError, match="draft_url"):
        RemoteReasoner(target_url, "127.0.0.1:8002")
    with pytest.raises(ValueError, match="target_model.*serves"):
        RemoteReasoner(target_url, draft_url, target_model="Qwen/Qwen3-32B")
    with pytest.raises(ValueError, match="target_tokenizer"):
        RemoteReasoner(target_url, draft_url, target_tokenizer=reasoner.draft.tokenizer)
    with pytest.raises(ValueError, match="alpha"):
        reasoner.generate(PROMPTS[0], alpha=2)
    with pytest.raises(ValueError, match="mode"):
        reasoner.generate(PROMPTS[0], mode="nope")
    with pytest.raises(ValueError, match="mode.*speculative-config"):
        reasoner.generate(PROMPTS[0], mode="token")
    for setting in (dict(draft_token_speculation="ngram"), dict(proposal_policy="adaptive")):
        with pytest.raises(ValueError, match=f"{next(iter(setting))}.*speculative-config"):
            reasoner.generate(PROMPTS[0], **setting)
    with pytest.raises(ValueError, match="unknown setting"):
        reasoner.generate(PROMPTS[0], alpah=0.5)
    with pytest.raises(ValueError, match="draft_url"):
        RemoteReasoner(target_url).generate(PROMPTS[0], mode="speculative")


def test_a_server_killed_mid_run_gives_a_clear_error_and_no_result(urls, vllm_server_factory):
    from conftest import VLLM_DRAFT

    server = vllm_server_factory(VLLM_DRAFT)
    reasoner = RemoteReasoner(urls[0], server.url, retries=1, timeout_s=60, **SETTINGS)

    async def run():
        stream = reasoner.astream(PROMPTS[0], mode="speculative", alpha=0.0)
        steps = []
        with pytest.raises(ServerError) as caught:
            async for step in stream:
                steps.append(step)
                if len(steps) == 1:
                    server.kill()
        return stream, steps, caught.value

    start = time.perf_counter()
    stream, steps, error = asyncio.run(run())
    assert time.perf_counter() - start < 120
    assert server.url in str(error) and "draft" in str(error) and error.url == server.url
    assert stream.result is None and len(steps) == 1  # nothing after the failure was committed
    # the target's server is untouched: the same reasoner goes on in mode "target"
    assert reasoner.generate(PROMPTS[0], mode="target").steps


def test_the_dreamr_server_over_vllm_with_the_openai_client(reasoner):
    import openai

    from dreamr.serve import create_app
    from test_serve import running

    expected = reasoner.generate(PROMPTS[0], mode="fpsr", alpha=0.8)
    with running(create_app(reasoner, served_model_name="dreamr")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        chunks = list(client.chat.completions.create(
            model="dreamr", messages=PROMPTS[0], stream=True, max_tokens=SETTINGS["max_new_tokens"],
            extra_body={"mode": "fpsr", "alpha": 0.8, "max_step_tokens": SETTINGS["max_step_tokens"]}))
        steps = [c.model_extra["dreamr_step"] for c in chunks if (c.model_extra or {}).get("dreamr_step")]
        assert [(s["text"], s["source"]) for s in steps] == _steps(expected)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        with pytest.raises(openai.BadRequestError, match="mode"):
            client.completions.create(model="dreamr", prompt="2 + 3 =", extra_body={"mode": "token"})


def test_the_command_line_over_vllm(urls, capsys):
    from dreamr.__main__ import main

    assert main(["--target-url", urls[0], "--draft-url", urls[1], "--gsm8k", "0", "--mode", "fpsr", "--json",
                 "--max-new-tokens", "48", "--max-step-tokens", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "fpsr" and out["steps"] and out["metrics"]["target_requests"] > 0
    assert out["verifier"]["verdict_head"] is None
