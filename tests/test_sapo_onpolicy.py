"""SAPO's update is on-policy: log-probabilities under the sampling distribution (temperature, top-p),
``old_logp`` recorded from the model that sampled, the clip acting from the second iteration on; the
loss equals a plain PyTorch GRPO reference written here (tiny random models, float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tokenizer, tiny_llama, tiny_qwen2
from dreamr.config import ReasonerConfig
from training import SAPOConfig, SAPOTrainer
from training.trainer import Rollout

ROWS = [{"question": "Natalia sold clips to 48 of her friends in April.", "answer": "72"},
        {"question": "How many clips did Natalia sell altogether?", "answer": "12"}]


@pytest.fixture(scope="module")
def toks():
    return build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)


def make(toks, *, temperature=0.9, top_p=1.0, **kw):
    tok_t, tok_d = toks
    base = dict(group_size=4, batch_prompts=1, total_steps=1, lr=1e-2, dtype="float64", max_grad_norm=0.0,
                weights=(1.0, 0.0, 1.0), length_max_tokens=6, length_max_steps=1,
                reasoner=ReasonerConfig(temperature=temperature, top_p=top_p, max_new_tokens=10))
    base.update(kw)
    return SAPOTrainer(tiny_qwen2(tok_d), tok_d, tiny_llama(tok_t), tok_t, data=ROWS, config=SAPOConfig(**base),
                       progress=False)


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with Gaussian noise of std ``scale`` added to every weight."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return out


# -- a plain GRPO reference: one completion at a time, no batching, no trainer code -------------------------


def reference_logps(model, prompt: list[int], completion: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """log pi(y_t | prefix) under softmax(logits / T) renormalised over the top-p nucleus ``[len(completion)]``:
    the nucleus is the smallest set of most probable tokens whose mass reaches top_p (a token is kept iff
    the mass of the tokens more probable than it is below top_p)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) + len(completion) - 1].double()
    scaled = logits / temperature
    if top_p < 1:
        probs = torch.softmax(scaled, -1).detach()
        p_sorted, order = probs.sort(-1, descending=True)
        before = p_sorted.cumsum(-1) - p_sorted  # mass of the strictly more probable tokens
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(scaled, -1)
    return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def reference_loss(policy, sampler, ref, prompt, completions, rewards, *, temperature, top_p, beta, eps=0.2):
    """-(1/sum|y|) sum_i sum_t [min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta k3], r = pi/pi_sampler, and
    the number of tokens whose ratio was clipped."""
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = (r - r.mean()) / (r.std() + 1e-4)
    total, tokens, clipped = 0.0, 0, 0
    for a, y in zip(adv, completions):
        lp = reference_logps(policy, prompt, y, temperature, top_p)
        with torch.no_grad():
            old = reference_logps(sampler, prompt, y, temperature, top_p)
            lref = reference_logps(ref, prompt, y, temperature, top_p) if beta else None
        ratio = torch.exp(lp - old)
        obj = torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        clipped += int(((ratio.clamp(1 - eps, 1 + eps) * a) < ratio * a).sum())
        if beta:
            d = lref - lp
            obj = obj - beta * (torch.exp(d) - d - 1)
        total = total - obj.sum()
        tokens += len(y)
    return total / tokens, clipped


# -- the tests ----------------------------------------------------------------------------------------------


def test_logprobs_are_those_generate_samples_from(toks):
    """The update's log-probabilities equal log softmax of the scores generate sampled from (temperature,
    then top-p): the distribution the trainer optimises is the one it samples."""
    tr = make(toks, temperature=0.7, top_p=0.8)
    prompt = tr.prompt_ids(ROWS[0]["question"])
    torch.manual_seed(0)
    x = torch.tensor([prompt] * 2)
    out = tr.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.7, top_p=0.8,
                            top_k=0, max_new_tokens=8, pad_token_id=tr.pad_id, eos_token_id=sorted(tr.eos_ids),
                            output_scores=True, return_dict_in_generate=True)
    completions = out.sequences[:, len(prompt):]
    want = torch.stack([torch.log_softmax(s.double(), -1).gather(-1, completions[:, t:t + 1]).squeeze(-1)
                        for t, s in enumerate(out.scores)], dim=1)
    # each completion up to its first EOS (what the trainer keeps); generate pads after it
    cut = [next((i + 1 for i, t in enumerate(row) if t in tr.eos_ids), len(row)) for row in completions.tolist()]
    ro = Rollout(prompt, [row[:n] for row, n in zip(completions.tolist(), cut)], [0.0, 1.0])
    mask = tr._batch([ro])[3] > 0
    assert torch.isfinite(want[mask]).all() and int(mask.sum()) >= 4
    got = tr._logps(tr.model, tr._batch([ro]))
    assert (got - want[:, :got.shape[1]])[mask].abs().max() < 1e-5  # generate's scores are float32
    # at temperature 1 without the nucleus (the update before this fix) they differ
    plain = make(toks, temperature=1.0)
    plain.model.load_state_dict(tr.model.state_dict())
    assert (plain._logps(plain.model, plain._batch([ro])) - want[:, :got.shape[1]])[mask].abs().max() > 1e-2


def test_ratio_is_one_on_the_first_step_and_moves_after_an_update(toks):
    tr = make(toks, num_iterations=3, lr=3e-2)
    assert tr.records_old_logps
    ro = tr.rollout(tr.data[0], 0, 0)
    ro.rewards = [1.0, 0.0, 0.5, 0.2]  # distinct rewards: every completion has an advantage
    assert [len(lp) for lp in ro.old_logps] == [len(c) for c in ro.completion_ids]
    recorded = [lp.clone() for lp in ro.old_logps]
    stats = tr.optimize([ro])
    assert stats["ratio_dev_first"] < 1e-12, stats  # the policy sampled the batch: ratio 1 at the first step
    assert abs(stats["ratio"] - 1.0) > 1e-3 and stats["clip_frac"] > 0, stats  # the third step: moved, clipped
    assert all(torch.equal(a, b) for a, b in zip(recorded, ro.old_logps))  # the sampler's values stay
    now = tr._logps(tr.model, tr._batch([ro]))
    assert max((now[i, :len(lp)] - lp).abs().max() for i, lp in enumerate(recorded)) > 1e-3


def test_one_iteration_keeps_the_ratio_at_one_and_a_bf16_sampler_is_corrected_for(toks):
    one = make(toks)
    assert not one.records_old_logps  # the policy's own detached values are the sampler's
    ro = one.rollout(one.data[0], 0, 0)
    ro.rewards = [1.0, 0.0, 0.5, 0.2]
    assert ro.old_logps is None and one.optimize([ro])["ratio_dev_first"] == 0.0
    bf = make(toks, rollout_dtype="bfloat16")
    assert bf.records_old_logps
    bf._refresh_rollout_model()
    ro = bf.rollout(bf.data[0], 0, 0)
    bf._rollout_model = None
    ro.rewards = [1.0, 0.0, 0.5, 0.2]
    assert bf.optimize([ro])["ratio_dev_first"] > 1e-4  # the bf16 copy's probabilities, not the policy's


def test_several_iterations_need_the_samplers_logprobs(toks):
    tr = make(toks, num_iterations=2)
    ro = Rollout(tr.prompt_ids(ROWS[0]["question"]), [[5, 6, 7], [8, 9], [10], [11, 12]], [1.0, 0.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="old_logps"):
        tr.optimize([ro])


@pytest.mark.parametrize("top_p,beta", [(1.0, 0.3), (0.9, 0.0)])
def test_loss_at_temperature_09_equals_a_plain_grpo_reference(toks, top_p, beta):
    tr = make(toks, temperature=0.9, top_p=top_p, beta=beta)
    # the policy has moved away from the frozen reference (a KL to measure), and another model sampled
    with torch.no_grad():
        moved = perturbed(tr.model, 0.05, seed=1)
        tr.model.load_state_dict(moved.state_dict())
    sampler = perturbed(tr.model, 0.2, seed=2).eval()
    tr._rollout_model = sampler
    ro = Rollout(tr.prompt_ids(ROWS[0]["question"]), tr.sample(tr.prompt_ids(ROWS[0]["question"]), 7), [])
    ro.rewards = [1.0, 0.0, 0.5, 0.2]
    tr.record_old_logps(ro)  # from the sampler, as at rollout time
    tr._rollout_model = None
    tr.config.num_iterations = 2  # the recorded values are used (not the policy's own)
    micro, total = tr.prepare([ro])
    loss, stats = tr.micro_loss(micro[0], total, model=tr.model)
    loss.backward()
    got_grad = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    tr.model.zero_grad(set_to_none=True)

    want, clipped = reference_loss(tr.model, sampler, tr.ref_model, ro.prompt_ids, ro.completion_ids, ro.rewards,
                                   temperature=0.9, top_p=top_p, beta=beta)
    assert clipped > 0  # the clip is exercised
    assert abs(float(loss) - float(want)) < 1e-10, (float(loss), float(want))
    want.backward()
    worst = max((got_grad[n] - p.grad).abs().max().item() for n, p in tr.model.named_parameters() if n in got_grad)
    assert worst < 1e-10
    if beta:
        # the KL is taken under the same distribution: at temperature 1 it would differ
        at_one, _ = reference_loss(tr.model, sampler, tr.ref_model, ro.prompt_ids, ro.completion_ids, ro.rewards,
                                   temperature=1.0, top_p=top_p, beta=beta)
        assert float(stats["kl_sum"]) > 0 and abs(float(at_one) - float(want)) > 1e-4


def test_a_kl_term_with_a_nucleus_is_refused(toks):
    with pytest.raises(ValueError, match="top_p"):
        make(toks, top_p=0.9, beta=0.1)
    with pytest.raises(ValueError, match="auto"):
        make(toks, reasoner=ReasonerConfig(alpha="auto", temperature=1.0))
    with pytest.raises(ValueError, match="temperature"):
        make(toks, temperature=0.0)
