"""The SAPO trainer on tiny random models (CPU, float64): updates, resume, data parallelism, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import pytest
import torch

from conftest import build_tokenizer, tiny_llama, tiny_qwen2
from dreamr.config import ReasonerConfig
from training import SAPOConfig, SAPOTrainer
from training.trainer import Rollout
from training.train_sapo import main as script_main

ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April.", "answer": "#### 72"},
    {"question": "How many clips did Natalia sell altogether?", "answer": "#### 12"},
    {"question": "Is the last step correct?", "answer": "#### 4"},
    {"question": "Step 1: 2 + 2 = 4.", "answer": "4"},
]


@pytest.fixture(scope="module")
def toks():
    return build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)


REASONER_FIELDS = {f.name for f in dataclasses.fields(ReasonerConfig)}


def make(toks, out_dir=None, rows=ROWS, **overrides):
    """A trainer on the tiny pair; overrides of ReasonerConfig fields (temperature, top_p, alpha, ...) go
    into the embedded reasoner config."""
    tok_t, tok_d = toks
    rc = dict(temperature=1.0, max_new_tokens=8)
    rc.update({k: overrides.pop(k) for k in list(overrides) if k in REASONER_FIELDS})
    kw = dict(group_size=3, batch_prompts=2, total_steps=2, lr=1e-2, dtype="float64",
              length_max_tokens=6, length_max_steps=1, reasoner=ReasonerConfig(**rc))
    kw.update(overrides)
    return SAPOTrainer(tiny_qwen2(tok_d), tok_d, tiny_llama(tok_t), tok_t, data=rows, config=SAPOConfig(**kw),
                       out_dir=out_dir, progress=False)


def seq_logps(trainer, rollout):
    with torch.no_grad():
        lp = trainer._logps(trainer.model, trainer._batch([rollout]))
    return lp.sum(dim=1)


def fixed_rollout(trainer, rewards):
    torch.manual_seed(3)
    prompt = trainer.prompt_ids(ROWS[0]["question"])
    completions = [torch.randint(3, 300, (n,)).tolist() for n in (5, 7, 4, 6)]
    return Rollout(prompt, completions[:len(rewards)], list(rewards))


def test_one_step_moves_logprobs_with_the_advantage(toks):
    tr = make(toks, group_size=4, batch_prompts=1, lr=1e-3)
    ro = fixed_rollout(tr, [1.0, 0.0, 1.0, 0.0])
    before = seq_logps(tr, ro)
    stats = tr.optimize([ro])
    after = seq_logps(tr, ro)
    delta = after - before
    assert delta[0] > 0 and delta[2] > 0, delta  # above-average completions became more likely
    assert delta[1] < 0 and delta[3] < 0, delta  # below-average ones less likely
    assert stats["tokens"] == 22 and stats["clip_frac"] == 0.0


def test_equal_rewards_give_no_policy_gradient(toks):
    tr = make(toks, group_size=4, batch_prompts=1, lr=1e-2)
    ro = fixed_rollout(tr, [0.5, 0.5, 0.5, 0.5])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    batch = tr._batch([ro])
    from training import grpo

    logp = tr._logps(tr.model, batch)
    adv = grpo.group_advantages(torch.tensor(ro.rewards, dtype=torch.float64), 4)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), adv, batch[3])
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in tr.model.parameters())
    tr.model.zero_grad(set_to_none=True)
    tr.optimize([ro])
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_train_logs_saves_and_output_loads(toks, tmp_path):
    tr = make(toks, tmp_path / "run", beta=0.1, num_iterations=2)
    hist = tr.train()
    assert [h["step"] for h in hist] == [1, 2]
    keys = {"reward", "r_outcome", "r_draft", "r_length", "acceptance", "kl", "clip_frac", "tokens_mean",
            "steps_mean", "lr", "loss", "grad_norm"}
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and keys <= set(lines[0])
    assert any(h["clip_frac"] > 0 for h in hist) and all(h["kl"] >= 0 for h in hist)
    assert (tmp_path / "run" / "checkpoint-000002" / "weights.safetensors").is_file()
    from dreamr.models import load

    loaded = load(tmp_path / "run")
    for (n, a), (_, b) in zip(tr.model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(a.detach().to(b.dtype), b), n
    assert loaded.tokenizer.encode("Yes No") == toks[1].encode("Yes No")
    from dreamr.reasoner import SpeculativeReasoner

    tiny_llama(toks[0]).save_pretrained(tmp_path / "target")
    toks[0].save_pretrained(tmp_path / "target")
    reasoner = SpeculativeReasoner.from_pretrained(target=tmp_path / "target", draft=tmp_path / "run",
                                                   max_step_tokens=4, max_new_tokens=8)
    assert reasoner.generate("Natalia sold clips.").steps


def _state(tr):
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    opt = tr.optimizer.state_dict()["state"]
    return params, {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()} for k, v in opt.items()}


def test_save_then_resume_is_bit_identical(toks, tmp_path):
    full = make(toks, tmp_path / "full", total_steps=4, save_every=2)
    full.train()
    part = make(toks, tmp_path / "part", total_steps=2)
    part.train()
    resumed = make(toks, tmp_path / "part", total_steps=4)
    resumed.load_checkpoint(tmp_path / "part")
    assert resumed.step == 2
    resumed.train()
    (p1, o1), (p2, o2) = _state(full), _state(resumed)
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    assert o1.keys() == o2.keys()
    for k in o1:
        for kk in o1[k]:
            a, b = o1[k][kk], o2[k][kk]
            assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    assert full.history[2:] == [{**h, "rollout_s": full.history[2 + i]["rollout_s"],
                                 "update_s": full.history[2 + i]["update_s"]} for i, h in enumerate(resumed.history)]


@contextlib.contextmanager
def _gloo_process(rank, world, rendezvous):
    """One process of a CPU process group; yields the test tokenizers. Both ranks leave together: a rank
    that tears gloo down while the other still has work queued aborts ("terminate called without an
    active exception")."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick, so no race with other processes for it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        yield build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, world, rendezvous, out):
    with _gloo_process(rank, world, rendezvous) as toks:
        tr = make(toks, batch_prompts=2, micro_batch_prompts=1, total_steps=2, beta=0.05)
        tr.train()
        if rank == 0:
            torch.save({n: p.detach() for n, p in tr.model.named_parameters()}, out)


def test_two_process_gloo_equals_one_process(toks, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    single = make(toks, batch_prompts=2, micro_batch_prompts=1, total_steps=2, beta=0.05)  # 2 accumulation steps
    single.train()
    ddp = torch.load(out)
    worst = max((ddp[n] - p.detach()).abs().max().item() for n, p in single.model.named_parameters())
    assert worst < 1e-12, worst
    moved = make(toks)
    assert any(not torch.equal(p, q) for p, q in zip(moved.model.parameters(), single.model.parameters()))


FSDP_RUN = dict(batch_prompts=4, micro_batch_prompts=1, total_steps=2, beta=0.05, save_every=1)


def make_fsdp(toks, out_dir=None, **overrides):
    """``make`` with many stop tokens: groups end early at different lengths on the two processes, so
    the sharded policy's generation must keep the processes' forwards in step (synced_gpus)."""
    tr = make(toks, out_dir, **{**FSDP_RUN, **overrides})
    tr.eos_ids = set(tr.eos_ids) | set(range(3, 100))
    return tr


def _fsdp_worker(rank, world, rendezvous, tmp):
    with _gloo_process(rank, world, rendezvous) as toks:
        # 2 prompts per process, 2 accumulation steps each; sharded policy and reference; checkpoints.
        tr = make_fsdp(toks, os.path.join(tmp, "fsdp"), fsdp=True)
        assert tr.fsdp and type(next(tr.model.parameters())).__name__ == "DTensor"
        tr.train()
        full = tr.trainable_state()  # collective: gathered to rank 0
        # Resume from step 1 under FSDP.
        re = make_fsdp(toks, os.path.join(tmp, "fsdp_resumed"), fsdp=True)
        re.load_checkpoint(os.path.join(tmp, "fsdp", "checkpoint-000001"))
        re.train()
        resumed = re.trainable_state()
        # bf16 rollout replica (gathered weights) and no clipping (norm of sharded gradients).
        bf = make_fsdp(toks, fsdp=True, total_steps=1, rollout_dtype="bfloat16", max_grad_norm=0.0)
        bf.train()
        bf_state = bf.trainable_state()
        if rank == 0:
            torch.save({"full": full, "resumed": resumed, "bf16": bf_state, "history": tr.history,
                        "bf16_history": bf.history}, os.path.join(tmp, "fsdp.pt"))


def test_two_process_fsdp_equals_one_process(toks, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "fsdp.pt")
    single = make_fsdp(toks, tmp_path / "single")  # 4 accumulation steps in one process
    single.train()
    ref = {n: p.detach() for n, p in single.model.named_parameters()}

    def worst(state):
        assert state.keys() == ref.keys()
        return max((state[n] - ref[n]).abs().max().item() for n in ref)

    # Same samples, rewards and token counts; the gradients are the same sums (the reduce-scatter's
    # division by 2 undoes the loss's * 2 exactly), but the clipping norm is summed shard by shard, so
    # the weights may differ in the last bits (seen: 1.4e-17), as DDP's bound allows.
    assert [h["tokens"] for h in got["history"]] == [h["tokens"] for h in single.history]
    assert [h["reward"] for h in got["history"]] == [h["reward"] for h in single.history]
    assert worst(got["full"]) < 1e-12, worst(got["full"])
    assert all(torch.equal(got["resumed"][n], got["full"][n]) for n in ref)  # resume under FSDP: bit-identical
    moved = make(toks)
    assert max((p.detach() - ref[n]).abs().max().item() for n, p in moved.model.named_parameters()) > 1e-4
    # The FSDP output folder loads as a plain draft with the trained weights.
    from dreamr.models import load

    loaded = dict(load(tmp_path / "fsdp").model.named_parameters())
    assert loaded.keys() == ref.keys() and all(loaded[n].dtype == torch.float64 for n in ref)
    assert max((loaded[n].detach() - ref[n]).abs().max().item() for n in ref) < 1e-12
    # Its checkpoints (optimizer keyed by parameter name) resume in one process, and the other way round
    # is covered by the same loader.
    cross = make_fsdp(toks, tmp_path / "cross")
    cross.load_checkpoint(tmp_path / "fsdp" / "checkpoint-000001")
    cross.train()
    assert max((p.detach() - ref[n]).abs().max().item() for n, p in cross.model.named_parameters()) < 1e-12
    # bf16 rollouts from the gathered replica, no clipping.
    one = make_fsdp(toks, total_steps=1, rollout_dtype="bfloat16", max_grad_norm=0.0)
    one.train()
    assert got["bf16_history"][0]["tokens"] == one.history[0]["tokens"]
    assert abs(got["bf16_history"][0]["grad_norm"] - one.history[0]["grad_norm"]) < 1e-12
    assert max((got["bf16"][n] - p.detach()).abs().max().item() for n, p in one.model.named_parameters()) < 1e-12


def test_bf16_and_lora_run(toks, tmp_path):
    tr = make(toks, dtype="bfloat16", rollout_dtype="bfloat16", batch_prompts=1, total_steps=1)
    assert tr.train()[0]["tokens"] > 0
    assert next(tr.model.parameters()).dtype == torch.float32  # fp32 master weights under bf16 autocast
    lo = make(toks, tmp_path / "lora", lora_r=4, lora_alpha=8, batch_prompts=1, total_steps=1, beta=0.1)
    base = {n: p.detach().clone() for n, p in lo.model.named_parameters() if not p.requires_grad}
    lo.train()
    assert all(torch.equal(base[n], p) for n, p in lo.model.named_parameters() if n in base)
    assert all("lora" in n for n, p in lo.model.named_parameters() if p.requires_grad)
    from dreamr.models import load

    merged = load(tmp_path / "lora")
    assert not any("lora" in n for n, _ in merged.model.named_parameters())


# -- bad input: errors before any training ------------------------------------------------------------------


class NoDecode:
    """A tokenizer that encodes but cannot decode (no way to hand text to the target)."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id, self.pad_token_id, self.chat_template = tok.eos_token_id, tok.pad_token_id, None

    def encode(self, *a, **k):
        return self._tok.encode(*a, **k)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rows=[]), "empty"),
    (dict(rows=[{"question": "q"}]), "no 'answer'"),
    (dict(rows=[{"answer": "1"}]), "no 'question'"),
    (dict(rows=[{"question": " ", "answer": "1"}]), "question"),
    (dict(group_size=1), "group_size"),
    (dict(weights=(0.0, 0.0, 0.0)), "weights"),
    (dict(weights=(1.0, -1.0, 1.0)), "weights"),
    (dict(batch_prompts=3, micro_batch_prompts=2), "batch_prompts"),
    (dict(fsdp=True, lora_r=4), "fsdp with LoRA"),
])
def test_bad_input_raises_before_training(toks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(toks, **kwargs)


def test_draft_and_target_that_cannot_exchange_text(toks):
    tok_t, tok_d = toks
    cfg = SAPOConfig(group_size=2, dtype="float64")
    with pytest.raises(ValueError, match="draft_tokenizer.*decode"):
        SAPOTrainer(tiny_qwen2(tok_d), NoDecode(tok_d), tiny_llama(tok_t), tok_t, data=ROWS, config=cfg)
    with pytest.raises(ValueError, match="target_tokenizer"):
        SAPOTrainer(tiny_qwen2(tok_d), tok_d, tiny_llama(tok_t), None, data=ROWS, config=cfg)
    with pytest.raises(ValueError, match="target"):
        SAPOTrainer(tiny_qwen2(tok_d), tok_d, None, None, data=ROWS, config=cfg)


def test_script_trains_resumes_and_rejects_bad_data(toks, tmp_path, capsys):
    tok_t, tok_d = toks
    tiny_llama(tok_t).save_pretrained(tmp_path / "target")
    tok_t.save_pretrained(tmp_path / "target")
    tiny_qwen2(tok_d).save_pretrained(tmp_path / "draft")
    tok_d.save_pretrained(tmp_path / "draft")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + json.dumps({**ROWS[2], "image": "x.png"}) + "\n")
    common = ["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--data", str(data),
              "--out", str(tmp_path / "out"), "-G", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--save-every", "1"]
    assert script_main(common + ["--steps", "1"]) == 0
    assert script_main(common + ["--steps", "2", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed at step 1" in text and "images ignored" in text
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 2
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        script_main(common[:4] + ["--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="group_size"):
        script_main(common + ["-G", "1"])
