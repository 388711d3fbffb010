"""The FPSR scheduler from Python (torch.classes.dreamr.FpsrScheduler through dreamr.scheduler).

Scripted event sequences (all accepted, a rejection in the middle with later verdicts already in,
out-of-order completions, late events of cancelled work, EOS inside the window, budgets, abort, the
on-reject policy), argument errors, and a randomised executor that completes work in random order (late
and stale events included) and must commit exactly what sequential speculative reasoning commits.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from dreamr.scheduler import (WORK_DRAFT, WORK_TARGET, WORK_VERIFY, Action, ActionKind as K, FinishReason,
                              Scheduler, StepEnd, TargetLaunch)


def kinds(actions, request=None):
    return [a.kind for a in actions if request is None or a.request == request]


def only(actions, kind, **match):
    found = [a for a in actions if a.kind == kind and all(getattr(a, k) == v for k, v in match.items())]
    assert len(found) == 1, (kind, match, [str(a) for a in actions])
    return found[0]


def test_action_namedtuple_and_enums():
    s = Scheduler(window=2, alpha=0.7)
    r = s.add_request(50)
    acts = s.poll()
    assert all(isinstance(a, Action) for a in acts)
    assert kinds(acts) == [K.LAUNCH_DRAFT, K.LAUNCH_TARGET]  # eager: t_0 launched with d_0
    d = acts[0]
    assert (d.request, d.slot, d.step, d.tokens) == (r, 0, 0, 50)
    assert acts[1].epoch == d.epoch and acts[1].aux == -1
    assert "LAUNCH_DRAFT" in str(d)
    assert s.window() == 2 and s.alpha() == pytest.approx(0.7)
    assert s.poll() == []  # nothing new without events


def test_all_accepted_commits_in_order_and_finishes_at_budget():
    s = Scheduler(window=2, alpha=0.5)
    r = s.add_request(9)
    d0 = s.poll()[0]
    s.on_draft_step(r, d0.slot, d0.epoch, 3, StepEnd.NONE)
    acts = s.poll()
    assert kinds(acts) == [K.LAUNCH_VERIFY, K.LAUNCH_DRAFT, K.LAUNCH_TARGET]
    d1 = only(acts, K.LAUNCH_DRAFT)
    assert (d1.step, d1.slot, d1.tokens) == (1, 1, 6)  # budget left on the prefix P + d_0
    s.on_verification(r, d0.slot, d0.epoch, 0.9)
    acts = s.poll()
    c = only(acts, K.COMMIT_DRAFT)
    assert (c.epoch, c.step, c.tokens, c.aux) == (d0.epoch, 0, 3, StepEnd.NONE)
    cancel = only(acts, K.CANCEL, epoch=d0.epoch)
    assert cancel.aux == WORK_TARGET  # the accepted step's fallback branch is no longer needed
    s.on_draft_step(r, d1.slot, d1.epoch, 6, StepEnd.NONE)
    s.on_verification(r, d1.slot, d1.epoch, 0.51)
    acts = s.poll()
    assert only(acts, K.COMMIT_DRAFT, epoch=d1.epoch).tokens == 6
    fin = only(acts, K.FINISH, request=r)
    assert (fin.aux, fin.step, fin.tokens) == (FinishReason.BUDGET, 2, 9)
    assert acts[-1].kind == K.FINISH and s.done(r) and s.all_done()
    info = s.info(r)
    assert (info["committed_tokens"], info["steps_from_draft"], info["open_slots"]) == (9, 2, 0)


def _fill_window(s, r, lengths):
    """Draft steps with the given lengths, each as soon as it is launched; returns the draft actions and
    every action seen."""
    drafts = []
    acts = s.poll()
    seen = list(acts)
    for n in lengths:
        d = only(acts, K.LAUNCH_DRAFT)
        drafts.append(d)
        s.on_draft_step(r, d.slot, d.epoch, n, StepEnd.NONE)
        acts = s.poll()
        seen += acts
    return drafts, seen


def test_out_of_order_verdicts_commit_in_step_order():
    s = Scheduler(window=3, alpha=0.5)
    r = s.add_request(100)
    drafts, _ = _fill_window(s, r, [2, 3, 4])
    assert s.info(r)["open_slots"] == 3
    # verdicts arrive last-first: nothing commits until the head is known
    s.on_verification(r, drafts[2].slot, drafts[2].epoch, 0.9)
    s.on_verification(r, drafts[1].slot, drafts[1].epoch, 0.9)
    assert not [a for a in s.poll() if a.kind in (K.COMMIT_DRAFT, K.COMMIT_TARGET)]
    s.on_verification(r, drafts[0].slot, drafts[0].epoch, 0.9)
    acts = s.poll()
    commits = [a for a in acts if a.kind == K.COMMIT_DRAFT]
    assert [a.step for a in commits] == [0, 1, 2] and [a.tokens for a in commits] == [2, 3, 4]
    # the window slides: the draft continues from P + d_0 + d_1 + d_2
    nxt = only(acts, K.LAUNCH_DRAFT)
    assert nxt.step == 3 and nxt.tokens == 100 - 9


@pytest.mark.parametrize("target_first", [True, False])
def test_rejection_in_the_middle_cancels_later_slots_and_commits_the_fallback(target_first):
    s = Scheduler(window=3, alpha=0.5)
    r = s.add_request(100)
    drafts, acts = _fill_window(s, r, [2, 3, 4])
    targets = {a.epoch for a in acts if a.kind == K.LAUNCH_TARGET}
    assert targets == {d.epoch for d in drafts}  # eager: every slot's fallback branch runs
    s.on_verification(r, drafts[2].slot, drafts[2].epoch, 0.99)  # accepted, but past the rejection
    if target_first:
        s.on_target_step(r, drafts[1].slot, drafts[1].epoch, 5, StepEnd.NONE)
    s.on_verification(r, drafts[1].slot, drafts[1].epoch, 0.1)  # rejected
    acts = s.poll()
    cancel2 = only(acts, K.CANCEL, epoch=drafts[2].epoch)
    assert cancel2.aux & WORK_DRAFT and cancel2.aux & WORK_TARGET  # early stopping: all of slot 2's work
    assert not [a for a in acts if a.kind in (K.COMMIT_DRAFT, K.COMMIT_TARGET)]  # the head is unknown
    s.on_verification(r, drafts[0].slot, drafts[0].epoch, 0.9)
    acts = s.poll()
    assert only(acts, K.COMMIT_DRAFT).epoch == drafts[0].epoch
    if not target_first:
        assert not [a for a in acts if a.kind == K.COMMIT_TARGET]  # waits for t_1
        s.on_target_step(r, drafts[1].slot, drafts[1].epoch, 5, StepEnd.NONE)
        acts = s.poll()
    ct = only(acts, K.COMMIT_TARGET)
    assert (ct.epoch, ct.step, ct.tokens) == (drafts[1].epoch, 1, 5)
    # eager: the committed branch continues as the next head's fallback (its cache holds the new prefix)
    cont = only(acts, K.LAUNCH_TARGET)
    assert cont.aux == drafts[1].epoch and cont.step == 2
    nd = only(acts, K.LAUNCH_DRAFT)
    assert nd.step == 2 and nd.tokens == 100 - 2 - 5 and nd.epoch not in (d.epoch for d in drafts)
    # late events of the cancelled slot 2 are stale: ignored and counted, never committed
    stale0 = s.stats()["stale_events"]
    s.on_draft_step(r, drafts[2].slot, drafts[2].epoch, 4, StepEnd.NONE)
    s.on_target_step(r, drafts[2].slot, drafts[2].epoch, 4, StepEnd.NONE)
    s.on_verification(r, drafts[2].slot, drafts[2].epoch, 0.99)
    assert s.stats()["stale_events"] == stale0 + 3
    assert not [a for a in s.poll() if a.kind in (K.COMMIT_DRAFT, K.COMMIT_TARGET)]
    info = s.info(r)
    assert (info["committed_steps"], info["committed_tokens"], info["steps_from_target"]) == (2, 7, 1)


def test_head_rejected_waits_for_its_target_step():
    s = Scheduler(window=2, alpha=0.5)
    r = s.add_request(40)
    drafts, _ = _fill_window(s, r, [3])
    s.on_verification(r, drafts[0].slot, drafts[0].epoch, float("nan"))  # NaN always rejects
    acts = s.poll()
    assert not [a for a in acts if a.kind == K.COMMIT_TARGET]
    s.on_target_step(r, drafts[0].slot, drafts[0].epoch, 7, StepEnd.EOS)
    acts = s.poll()
    assert only(acts, K.COMMIT_TARGET).aux == StepEnd.EOS
    assert only(acts, K.FINISH).aux == FinishReason.EOS
    assert s.finish_reason(r) == FinishReason.EOS
    assert s.stats()["rejected"] == 1


def test_eos_and_answer_marker_inside_the_window_stop_the_draft_chain():
    s = Scheduler(window=4, alpha=0.5)
    r = s.add_request(100)
    d0 = s.poll()[0]
    s.on_draft_step(r, d0.slot, d0.epoch, 2, StepEnd.ANSWER_MARKER)
    acts = s.poll()
    assert not [a for a in acts if a.kind == K.LAUNCH_DRAFT]  # nothing is drafted past the answer
    s.on_verification(r, d0.slot, d0.epoch, 0.8)
    acts = s.poll()
    assert only(acts, K.COMMIT_DRAFT).aux == StepEnd.ANSWER_MARKER
    assert only(acts, K.FINISH).aux == FinishReason.ANSWER_MARKER


def test_on_reject_policy_launches_targets_only_for_rejections():
    s = Scheduler(window=3, alpha=0.5, target_launch=TargetLaunch.ON_REJECT)
    r = s.add_request(100)
    acts = s.poll()
    assert kinds(acts) == [K.LAUNCH_DRAFT]
    d0 = acts[0]
    s.on_draft_step(r, d0.slot, d0.epoch, 3, StepEnd.NONE)
    acts = s.poll()
    assert K.LAUNCH_TARGET not in kinds(acts)
    d1 = only(acts, K.LAUNCH_DRAFT)
    s.on_draft_step(r, d1.slot, d1.epoch, 3, StepEnd.NONE)
    s.poll()
    s.on_verification(r, d1.slot, d1.epoch, 0.2)  # position 1 rejects before position 0 resolves
    acts = s.poll()
    t1 = only(acts, K.LAUNCH_TARGET)
    assert t1.epoch == d1.epoch and t1.aux == -1 and t1.tokens == 97
    s.on_verification(r, d0.slot, d0.epoch, 0.6)
    s.on_target_step(r, d1.slot, d1.epoch, 4, StepEnd.NONE)
    acts = s.poll()
    assert [a.kind for a in acts if a.kind in (K.COMMIT_DRAFT, K.COMMIT_TARGET)] == [K.COMMIT_DRAFT,
                                                                                      K.COMMIT_TARGET]
    assert s.stats()["targets_launched"] == 1


@pytest.mark.parametrize("launch", [TargetLaunch.EAGER, TargetLaunch.ON_REJECT])
def test_drafting_off_opens_target_steps_alone_at_the_head(launch):
    """With drafting off a request opens one position at a time, with only its target step (whatever the
    launch policy), committed once written; the branch continues into the next one. Drafting back on
    applies from the next position opened."""
    s = Scheduler(window=3, alpha=0.5, target_launch=launch)
    r = s.add_request(100, drafting=False)
    assert s.info(r)["drafting"] == 0
    t0 = only(s.poll(), K.LAUNCH_TARGET)
    assert (t0.step, t0.tokens, t0.aux) == (0, 100, -1)
    s.on_target_step(r, t0.slot, t0.epoch, 4, StepEnd.NONE)
    acts = s.poll()
    assert kinds(acts) == [K.COMMIT_TARGET, K.LAUNCH_TARGET]
    t1 = acts[1]
    assert (t1.step, t1.tokens, t1.aux) == (1, 96, t0.epoch)  # continues the committed branch
    s.set_drafting(r, True)
    assert s.poll() == [] and s.info(r)["drafting"] == 1
    s.on_target_step(r, t1.slot, t1.epoch, 6, StepEnd.NONE)
    acts = s.poll()
    assert kinds(acts) == [K.COMMIT_TARGET, K.LAUNCH_DRAFT] + ([K.LAUNCH_TARGET] if launch == TargetLaunch.EAGER else [])
    stats = s.stats()
    assert (stats["undrafted_steps"], stats["drafts_launched"], stats["verifications"]) == (2, 1, 0)
    assert stats["steps_committed_target"] == 2 and s.info(r)["committed_tokens"] == 10
    with pytest.raises(ValueError, match="set_drafting: unknown request 9"):
        s.set_drafting(9, False)


def test_abort_and_set_budget():
    s = Scheduler(window=2, alpha=0.5)
    a, b = s.add_request(100), s.add_request(100)
    s.poll()
    s.abort(a)
    acts = s.poll()
    assert only(acts, K.FINISH, request=a).aux == FinishReason.ABORTED
    assert {x.kind for x in acts if x.request == a} == {K.CANCEL, K.FINISH}
    assert not s.done(b) and not s.all_done()
    s.set_budget(b, 1)
    assert all(x.request == b for x in s.poll())
    # the budget now allows one token: a step that reports more is committed as reported, then finishes
    d_epoch = s.slot_epoch(b, 0)
    s.on_draft_step(b, 0, d_epoch, 3, StepEnd.NONE)
    s.poll()
    s.on_verification(b, 0, d_epoch, 0.9)
    acts = s.poll()
    assert only(acts, K.FINISH, request=b).aux == FinishReason.BUDGET and s.all_done()


def test_max_active_requests_queue_fifo():
    s = Scheduler(window=1, alpha=0.0, max_active_requests=1)
    a, b = s.add_request(2), s.add_request(2)
    acts = s.poll()
    assert {x.request for x in acts} == {a} and s.num_waiting() == 1 and s.num_active() == 1
    d = only(acts, K.LAUNCH_DRAFT)
    s.on_draft_step(a, d.slot, d.epoch, 2, StepEnd.NONE)
    s.poll()
    s.on_verification(a, d.slot, d.epoch, 0.0)  # alpha 0 accepts even cpn 0
    acts = s.poll()
    assert only(acts, K.FINISH, request=a).aux == FinishReason.BUDGET
    assert only(acts, K.LAUNCH_DRAFT, request=b).step == 0


def test_acceptance_rule_ends():
    assert Scheduler(alpha=0.0).accepts(0.0) and not Scheduler(alpha=0.0).accepts(math.nan)
    assert not Scheduler(alpha=1.0).accepts(1.0)
    s = Scheduler(alpha=0.7)
    assert s.accepts(0.7000001) and not s.accepts(0.7)
    # the kernels' rule (dreamr::accepts): float32, so a float32 cpn of 0.85 does not pass alpha 0.85, and
    # alpha 1 rejects even a cpn above 1
    assert not Scheduler(alpha=0.85).accepts(torch.tensor(0.85).item())
    assert not Scheduler(alpha=1.0).accepts(1.5)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(window=0), "window"), (dict(window=-1), "window"), (dict(alpha=1.5), "alpha"),
    (dict(alpha=math.nan), "alpha"), (dict(target_launch=7), "target_launch"),
    (dict(max_active_requests=-1), "max_active_requests"), (dict(max_step_tokens=-3), "max_step_tokens"),
])
def test_bad_config_raises_value_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Scheduler(**kwargs)


def test_bad_events_raise_value_error():
    s = Scheduler(window=2)
    r = s.add_request(10)
    d = s.poll()[0]
    with pytest.raises(ValueError, match="budget_tokens"):
        s.add_request(0)
    with pytest.raises(ValueError):
        s.on_draft_step(r + 5, d.slot, d.epoch, 1, StepEnd.NONE)  # unknown request
    with pytest.raises(ValueError):
        s.on_draft_step(r, 2, d.epoch, 1, StepEnd.NONE)  # slot out of [0, W)
    with pytest.raises(ValueError):
        s.on_draft_step(r, d.slot, 999, 1, StepEnd.NONE)  # epoch never issued
    with pytest.raises(ValueError):
        s.on_draft_step(r, d.slot, d.epoch, 0, StepEnd.NONE)  # a step of no tokens makes no progress
    with pytest.raises(ValueError):
        s.on_verification(r, d.slot, d.epoch, 1.5)


# -- randomised executor vs sequential speculative reasoning -------------------------------------------

def _h(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


class World:
    """Deterministic 'models': a step's length, end and verdict depend only on its prefix (step labels)."""

    def __init__(self, seed, p_accept):
        self.seed, self.p_accept = seed, p_accept

    def draft(self, prefix, cap):
        n = min(1 + _h(self.seed, "d", prefix) % 6, cap)
        end = StepEnd.EOS if _h(self.seed, "de", prefix) % 11 == 0 else StepEnd.NONE
        return n, end

    def target(self, prefix, cap):
        n = min(1 + _h(self.seed, "t", prefix) % 6, cap)
        end = StepEnd.EOS if _h(self.seed, "te", prefix) % 9 == 0 else StepEnd.NONE
        return n, end

    def verdict(self, prefix):
        return (_h(self.seed, "v", prefix) % 1000) / 1000.0 < self.p_accept


def sequential(world, budget, max_step):
    committed, tokens = (), 0
    while tokens < budget:
        cap = min(budget - tokens, max_step) if max_step else budget - tokens
        n, end = world.draft(committed, cap)
        if world.verdict(committed + (("d", n, end),)):
            label = ("d", n, end)
        else:
            m, tend = world.target(committed, cap)
            label = ("t", m, tend)
        committed += (label,)
        tokens += label[1]
        if label[2] != StepEnd.NONE:
            break
    return list(committed)


def drive_randomly(world, budgets, window, launch, max_step, rng):
    s = Scheduler(window=window, alpha=0.5, target_launch=launch, max_step_tokens=max_step)
    reqs = [s.add_request(b) for b in budgets]
    committed = {r: [] for r in reqs}
    chain = {r: {} for r in reqs}  # step -> epoch of the open chain
    drafted = {}  # epoch -> label
    prefix_of = {}  # epoch -> prefix labels
    inflight, cancelled = [], []
    finished = set()

    def prefix(r, step):
        return tuple(committed[r]) + tuple(drafted[chain[r][k]] for k in range(len(committed[r]), step))

    def apply(actions):
        for a in actions:
            r = a.request
            if a.kind == K.LAUNCH_DRAFT:
                for k in [k for k in chain[r] if k >= a.step]:
                    del chain[r][k]
                chain[r][a.step] = a.epoch
                prefix_of[a.epoch] = prefix(r, a.step)
                inflight.append(("draft", a))
            elif a.kind == K.LAUNCH_VERIFY:
                inflight.append(("verify", a))
            elif a.kind == K.LAUNCH_TARGET:
                inflight.append(("target", a))
            elif a.kind == K.CANCEL:
                names = {n for bit, n in ((WORK_DRAFT, "draft"), (WORK_VERIFY, "verify"), (WORK_TARGET, "target"))
                         if a.aux & bit}
                for item in [i for i in inflight if i[1].epoch == a.epoch and i[0] in names]:
                    inflight.remove(item)
                    cancelled.append(item)
            elif a.kind == K.COMMIT_DRAFT:
                assert a.step == len(committed[r])
                label = drafted[a.epoch]
                assert (label[1], label[2]) == (a.tokens, a.aux)
                committed[r].append(label)
            elif a.kind == K.COMMIT_TARGET:
                assert a.step == len(committed[r])
                committed[r].append(target_label[a.epoch])
            elif a.kind == K.FINISH:
                assert r not in finished
                finished.add(r)

    target_label = {}
    apply(s.poll())
    while not s.all_done():
        if cancelled and rng.random() < 0.2:  # a late event of cancelled work: must be ignored
            kind, a = cancelled.pop(rng.randrange(len(cancelled)))
            before = s.stats()["stale_events"]
            if kind == "draft":
                s.on_draft_step(a.request, a.slot, a.epoch, 1, StepEnd.NONE)
            elif kind == "verify":
                s.on_verification(a.request, a.slot, a.epoch, 1.0)
            else:
                s.on_target_step(a.request, a.slot, a.epoch, 1, StepEnd.NONE)
            assert s.stats()["stale_events"] == before + 1
        else:
            assert inflight, "work must remain while requests are open"
            kind, a = inflight.pop(rng.randrange(len(inflight)))
            if kind == "draft":
                n, end = world.draft(prefix_of[a.epoch], a.tokens)
                drafted[a.epoch] = ("d", n, end)
                s.on_draft_step(a.request, a.slot, a.epoch, n, end)
            elif kind == "verify":
                ok = world.verdict(prefix_of[a.epoch] + (drafted[a.epoch],))
                if rng.random() < 0.5:
                    s.on_verdict(a.request, a.slot, a.epoch, ok)
                else:
                    s.on_verification(a.request, a.slot, a.epoch, 0.9 if ok else 0.1)
            else:
                m, end = world.target(prefix_of[a.epoch], a.tokens)
                target_label[a.epoch] = ("t", m, end)
                s.on_target_step(a.request, a.slot, a.epoch, m, end)
        apply(s.poll())
    assert finished == set(reqs)
    return committed, s.stats()


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("launch", [TargetLaunch.EAGER, TargetLaunch.ON_REJECT])
def test_random_completion_order_commits_what_sequential_commits(window, launch):
    rng = random.Random(window * 10 + int(launch))
    total_cancelled = 0
    for trial in range(12):
        world = World(seed=trial, p_accept=[0.0, 0.3, 0.7, 1.0][trial % 4])
        budgets = [rng.randrange(1, 40) for _ in range(3)]
        max_step = [0, 4][trial % 2]
        got, stats = drive_randomly(world, budgets, window, launch, max_step, rng)
        for r, b in enumerate(budgets):
            assert got[r] == sequential(world, b, max_step), (trial, r)
        total_cancelled += stats["slots_cancelled"]
        if launch == TargetLaunch.ON_REJECT:
            assert stats["targets_launched"] <= stats["rejected"]
    if window > 1:
        assert total_cancelled > 0  # early stopping really happened


def test_enums_are_the_compiled_cores():
    """The Python enums are built from the tables the C++ core exports (csrc/bindings.cpp), and those hold
    the numbers the header documents as part of the Python API (csrc/scheduler/fpsr_scheduler.h)."""
    from dreamr import scheduler

    documented = {
        "ActionKind": {"LAUNCH_DRAFT": 0, "LAUNCH_VERIFY": 1, "LAUNCH_TARGET": 2, "CANCEL": 3, "COMMIT_DRAFT": 4,
                       "COMMIT_TARGET": 5, "FINISH": 6},
        "StepEnd": {"NONE": 0, "EOS": 1, "ANSWER_MARKER": 2},
        "FinishReason": {"NONE": 0, "EOS": 1, "ANSWER_MARKER": 2, "BUDGET": 3, "ABORTED": 4},
        "TargetLaunch": {"EAGER": 0, "ON_REJECT": 1},
        "Work": {"WORK_DRAFT": 1, "WORK_VERIFY": 2, "WORK_TARGET": 4},
    }
    for name, values in documented.items():
        assert scheduler.enum_values(name) == values
        if name != "Work":
            assert {m.name: int(m) for m in getattr(scheduler, name)} == values
    assert (WORK_DRAFT, WORK_VERIFY, WORK_TARGET) == (1, 2, 4)
    with pytest.raises(ValueError, match="enum_values: name must be one of"):
        scheduler.enum_values("Colour")
    # the Python names reach the C++ side as its numbers: an on-reject scheduler launches no target
    s = Scheduler(window=2, alpha=0.5, target_launch=TargetLaunch.ON_REJECT)
    s.add_request(10)
    assert kinds(s.poll()) == [K.LAUNCH_DRAFT]


def test_scheduler_module_copies_no_numbers():
    """dreamr/scheduler.py assigns no enum member a literal number (they come from the core)."""
    import ast
    import inspect

    from dreamr import scheduler

    tree = ast.parse(inspect.getsource(scheduler))
    literal_ints = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int)]
    assert literal_ints == []
