"""The judge's calibration: verdict heads scored by the fused op, contextual calibration, pair files,
batched feature extraction on a cached prefix, and the fit (python -m dreamr.calibrate)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dreamr import ops
from dreamr.cache import CachedSequence
from dreamr.calibrate.features import FeatureExtractor
from dreamr.calibrate.fit import FeatureSet, auroc, figures, fit_head, pair_accuracy, step_scores
from dreamr.calibrate.pairs import (KINDS, build_groups, change_result_number, groups_to_pairs, pairs_to_groups,
                                    read_pairs, read_problems, repetition_loop, solution_steps, write_pairs)
from dreamr.testing import target_tokenizer, tiny_gemma3, tiny_llama
from dreamr.verify import StepVerifier
from dreamr.verify.head import NULL_STEP, VerdictHead, calibrated_cpn, target_identity

GSM8K_LINES = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty has 4 apples and buys 3 more. How many apples does she have?",
     "answer": "She has 4 + 3 = <<4+3=7>>7 apples.\n#### 7"},
]


@pytest.fixture(scope="module")
def tok():
    return target_tokenizer()


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in GSM8K_LINES * 4))
    return path


def random_head(hidden: int, seed: int = 0, calibrated: bool = False) -> VerdictHead:
    g = torch.Generator().manual_seed(seed)
    return VerdictHead(torch.randn(2, hidden, generator=g), torch.randn(2, generator=g), calibrated=calibrated)


# -- the head through the fused op --------------------------------------------------------------------


@pytest.mark.parametrize("calibrate", [False, True])
def test_head_cpn_equals_plain_pytorch(calibrate):
    head = random_head(48, seed=3)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 48, generator=g)
    null = torch.randn(1, 48, generator=g).expand(7, -1) if calibrate else None
    cpn, accept = head.cpn(hidden, 0.6, null)
    # plain PyTorch: the two rows' logits, their difference through a sigmoid (no bias when calibrated)
    w, b = head.weight.double(), head.bias.double()
    h = hidden.double() - (null.double() if calibrate else 0.0)
    logits = h @ w.T + (0.0 if calibrate else b)
    want = torch.sigmoid(logits[:, 0] - logits[:, 1]).float()
    torch.testing.assert_close(cpn, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.reference_cpn(hidden, null), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(accept, cpn > 0.6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("calibrate", [False, True])
def test_head_cpn_on_cuda_equals_the_cpu(calibrate):
    """The head goes through the fused op on CUDA too (its rows moved to the hidden states' device once)."""
    head = random_head(640, seed=4)
    hidden = torch.randn(9, 640)
    null = torch.randn(1, 640).expand(9, -1) if calibrate else None
    want, want_accept = head.cpn(hidden, 0.5, null)
    got, accept = head.cpn(hidden.cuda(), 0.5, None if null is None else null.cuda())
    assert got.is_cuda and accept.is_cuda
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(accept.cpu(), want_accept)
    torch.testing.assert_close(head.reference_cpn(hidden, null), want, rtol=1e-5, atol=1e-6)


def test_head_is_the_fused_op_with_two_rows():
    head = random_head(16, seed=5)
    hidden = torch.randn(4, 16)
    got, _ = head.cpn(hidden, 0.5)
    want, _ = ops.cpn_verify(hidden, head.weight, [0], [1], 0.5, lm_head_bias=head.bias)
    assert torch.equal(got, want)


def test_from_direction_gives_that_margin():
    d = torch.randn(12, dtype=torch.float64)
    head = VerdictHead.from_direction(d, 0.7)
    h = torch.randn(5, 12)
    torch.testing.assert_close(head.reference_cpn(h), torch.sigmoid(h.double() @ d + 0.7).float())


def test_calibration_with_the_step_itself_gives_one_half():
    head = random_head(32, seed=2)
    hidden = torch.randn(5, 32) * 10
    cpn, accept = head.cpn(hidden, 0.5, hidden)
    assert torch.equal(cpn, torch.full((5,), 0.5))
    assert not accept.any()  # 0.5 is not > 0.5
    raw = torch.tensor([0.1, 0.5, 0.93, 1.0, 0.0])
    assert torch.equal(calibrated_cpn(raw, raw), torch.full((5,), 0.5))


def test_calibrated_cpn_is_the_margin_difference():
    lm = torch.tensor([0.2, 0.7, 0.9])
    null = torch.tensor([0.5, 0.7, 0.6])
    logit = lambda p: torch.log(p.double()) - torch.log1p(-p.double())  # noqa: E731
    want = torch.sigmoid(logit(lm) - logit(null)).float()
    torch.testing.assert_close(calibrated_cpn(lm, null), want)
    assert torch.isnan(calibrated_cpn(torch.tensor([float("nan")]), torch.tensor([0.4]))).all()


def test_calibration_with_a_null_step_equal_to_the_step_through_the_model(tok):
    model = tiny_llama(tok)
    ex = FeatureExtractor(model, tok, null_step="Step 1: 2 + 2 = 4.")
    h = ex.hidden("How many clips did Natalia sell?", [], ["Step 1: 2 + 2 = 4."])
    head = random_head(h.shape[1])
    cpn, _ = head.cpn(h[:1], 0.5, h[1:])
    assert float(cpn[0]) == 0.5
    lm = ex.lm_cpn(h)
    assert float(calibrated_cpn(lm[:1], lm[1:])[0]) == 0.5


# -- head files and target identity -------------------------------------------------------------------


def test_head_saves_and_loads(tmp_path, tok):
    model = tiny_llama(tok)
    head = random_head(32, calibrated=True)
    head.meta.update(target=target_identity(model, "tiny"), template="T?")
    head.save(tmp_path / "h")
    back = VerdictHead.load(tmp_path / "h", model, template="T?")
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    assert back.calibrated and back.meta["target"]["name"] == "tiny"
    assert json.loads((tmp_path / "h" / "head.json").read_text())["hidden_size"] == 32


def test_head_for_another_hidden_size_is_refused(tmp_path, tok):
    model = tiny_llama(tok)  # hidden 32
    other = tiny_gemma3(tok)  # hidden 32 too, another model type: refused by its identity
    head = random_head(24)
    head.meta["target"] = {"name": "elsewhere", "hidden_size": 24}
    head.save(tmp_path / "h")
    with pytest.raises(ValueError, match="verdict_head.*hidden size 24"):
        VerdictHead.load(tmp_path / "h", model)
    head32 = random_head(32)
    head32.meta["target"] = target_identity(model, "tiny-llama")
    head32.save(tmp_path / "h32")
    with pytest.raises(ValueError, match="verdict_head.*model_type"):
        VerdictHead.load(tmp_path / "h32", other)
    with pytest.raises(ValueError, match="hidden"):
        head32.cpn(torch.randn(2, 24), 0.5)


def test_head_for_another_target_of_the_same_shape_is_refused(tmp_path, tok):
    model, other = tiny_llama(tok, seed=0), tiny_llama(tok, seed=7)  # same config, other weights
    head = random_head(32)
    head.meta["target"] = target_identity(model, "tiny")
    head.save(tmp_path / "h")
    VerdictHead.load(tmp_path / "h", model.float())  # another dtype of the same target is accepted
    with pytest.raises(ValueError, match="verdict_head.*fingerprint"):
        VerdictHead.load(tmp_path / "h", other)


def test_head_with_another_template_or_no_files_is_refused(tmp_path):
    head = random_head(8)
    head.meta["template"] = "Correct? Yes or No.\nAnswer:"
    head.save(tmp_path / "h")
    with pytest.raises(ValueError, match="verdict_head.*verdict_template"):
        VerdictHead.load(tmp_path / "h", template="Is the last step correct? Answer Yes or No.\nAnswer:")
    with pytest.raises(ValueError, match="verdict_head.*not a verdict head folder"):
        VerdictHead.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="verdict_head.*\\[2, H\\]"):
        VerdictHead(torch.zeros(3, 8), torch.zeros(2))


# -- pairs -------------------------------------------------------------------------------------------


def test_solution_steps_drop_calculator_annotations_and_end_with_the_answer():
    steps, final = solution_steps(GSM8K_LINES[0]["answer"])
    assert steps == ("Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether in April and May.",
                     "The answer is 72.")
    assert final == "72"


def test_result_number_is_changed():
    rng = random.Random(0)
    for _ in range(20):
        bad = change_result_number("Natalia sold 48/2 = 24 clips in May.", rng)
        assert bad.startswith("Natalia sold 48/2 = ") and bad.endswith(" clips in May.") and "= 24 " not in bad
        dec = change_result_number("Weng earns 12/60 = $0.2 per minute.", rng)
        assert dec != "Weng earns 12/60 = $0.2 per minute." and dec.startswith("Weng earns 12/60 = $")
    assert change_result_number("No numbers here.", rng) is None
    assert change_result_number("The answer is 1,000.", random.Random(1)) != "The answer is 1,000."


def test_repetition_loop_repeats():
    loop = repetition_loop("She makes the amount of money from selling eggs.", "q", random.Random(3))
    words = loop.lower().split()
    assert len(words) >= 9 and len(set(words)) < len(words) / 2


def test_groups_have_every_kind_and_are_reproducible(gsm8k_file):
    problems = read_problems(gsm8k_file)
    groups = build_groups(problems, seed=4)
    assert groups == build_groups(problems, seed=4)
    assert sum(len(p.steps) for p in problems) == len(groups)
    for g in groups:
        assert set(g.bad) <= set(KINDS) and g.good not in g.bad.values()
        assert problems[g.problem].steps[:g.position] == tuple(g.context_steps)
    assert {k for g in groups for k in g.bad} == set(KINDS)
    assert len(build_groups(problems, seed=4, positions=1)) == len(problems)


def test_pair_file_round_trip_and_grouping(tmp_path, gsm8k_file):
    groups = build_groups(read_problems(gsm8k_file, limit=3), seed=0)
    pairs = groups_to_pairs(groups)
    n = write_pairs(tmp_path / "p.jsonl", pairs)
    back = read_pairs(tmp_path / "p.jsonl")
    assert n == len(back) == sum(len(g.bad) for g in groups) and back == pairs
    regrouped, where = pairs_to_groups(back)
    assert len(regrouped) == len(groups)
    for pair, (g, i, j) in zip(back, where):
        steps = [regrouped[g].good] + list(regrouped[g].bad.values())
        assert steps[i] == pair.good_step and steps[j] == pair.bad_step


def test_pair_file_with_a_missing_field_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "context_steps": [], "good_step": "a"}) + "\n")
    with pytest.raises(ValueError, match="pairs.*bad_step"):
        read_pairs(path)
    path.write_text(json.dumps({"question": "q", "context_steps": "a", "good_step": "a", "bad_step": "b"}) + "\n")
    with pytest.raises(ValueError, match="pairs.*context_steps"):
        read_pairs(path)
    with pytest.raises(ValueError, match="pairs.*no such file"):
        read_pairs(tmp_path / "missing.jsonl")


# -- features ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_batched_features_equal_the_verifiers_forward(tok, make):
    """One cached prefix and a right-padded batch give the hidden state the verifier reads step by step."""
    model = make(tok)
    ex = FeatureExtractor(model, tok)
    verifier = StepVerifier(model, tok)
    question = "Natalia sold clips to 48 of her friends in April."
    context = ["Step 1: 2 + 2 = 4.", "Step 2: 4 * 3 = 12."]
    steps = ["The answer is 12.", "No no", "Step 1: 2 + 2 = 4. Step 1: 2 + 2 = 4. Step 1: 2 + 2 = 4."]
    ex.hidden(question, context[:1], steps)  # a shorter prefix first: the next call extends its cache
    h = ex.hidden(question, context, steps)
    assert h.shape == (len(steps) + 1, 32)
    for i, step in enumerate(steps + [NULL_STEP]):
        seq = CachedSequence(model, ex.prefix_ids(question, context))
        text = ex.step_text(step)
        want = seq.last_hidden(tok.encode(text, add_special_tokens=False) + verifier.suffix_ids(text))
        torch.testing.assert_close(h[i], want[0].float(), rtol=1e-6, atol=1e-6)
        seq = CachedSequence(model, ex.prefix_ids(question, context))
        cpn, _ = verifier.verify(seq, tok.encode(text, add_special_tokens=False), text, commit=False)
        assert abs(float(ex.lm_cpn(h[i:i + 1])[0]) - cpn) < 1e-6
    # the prompt is framed as chat messages with the system prompt, as the CLI sends it
    assert ex.prefix_ids(question, []) == ex.lm.encode_prompt(
        [{"role": "system", "content": ex.system_prompt}, {"role": "user", "content": question}])


# -- fitting -----------------------------------------------------------------------------------------


def synthetic_features(n_groups: int, hidden: int, seed: int, shift: float = 5.0) -> FeatureSet:
    """Groups whose good step sits +1 along a direction, bad steps -1, and a large per-prefix shift
    along another direction (the level that moves from one context to the next)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(hidden)
    direction[0] = 1.0
    level = torch.zeros(hidden)
    level[1] = 1.0
    out = FeatureSet()
    for i in range(n_groups):
        base = torch.randn(hidden, generator=g) * 0.3 + level * shift * torch.randn(1, generator=g)
        good = base + direction + 0.1 * torch.randn(hidden, generator=g)
        bads = [base - direction + 0.1 * torch.randn(hidden, generator=g) for _ in range(3)]
        null = base + 0.1 * torch.randn(hidden, generator=g)
        out.hidden.append(torch.stack([good, *bads, null]))
        out.lm_cpn.append(torch.full((5,), 0.5))
        out.kinds.append(list(KINDS))
        out.problem.append(i)
    return out


@pytest.mark.parametrize("calibrated", [False, True])
def test_head_fitted_on_separable_hidden_states_separates_them(calibrated):
    train, test = synthetic_features(60, 16, seed=0), synthetic_features(30, 16, seed=1)
    head, info = fit_head(train, calibrated=calibrated, seed=0)
    good, bad, kinds = step_scores(test, head, calibrate=calibrated)
    fig = figures(good, bad, kinds)
    assert fig["auroc"] == 1.0 and fig["pair_accuracy"] == 1.0 and fig["n_pairs"] == 90
    assert min(good) > 0.5 > max(bad)
    assert info["l2"] > 0 and head.calibrated is calibrated
    if calibrated:
        assert float(head.bias.abs().max()) == 0.0  # l - l_null: the bias would cancel


def test_auroc_and_pair_accuracy():
    pos, neg = [0.9, 0.8, 0.4, 0.4], [0.1, 0.4, 0.85]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(pos, neg) == pytest.approx(brute)
    assert pair_accuracy([0.9, 0.2, 0.5], [0.1, 0.3, 0.5]) == pytest.approx(0.5)
    assert pair_accuracy([float("nan")], [0.1]) == 0.0


# -- the CLI end to end on a tiny model ---------------------------------------------------------------


def test_cli_fit_and_score(tmp_path, tok, gsm8k_file, capsys):
    from dreamr.calibrate.__main__ import main

    folder = tmp_path / "tiny"
    tiny_llama(tok, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "head"
    assert main(["fit", "--target", str(folder), "--train", str(gsm8k_file), "--out", str(out), "--max-pairs", "30",
                 "--heldout", "0.34", "--no-progress", "--seed", "1", "--other-out", str(tmp_path / "h")]) == 0
    meta = json.loads((out / "head.json").read_text())
    assert meta["calibrated"] and meta["features"] == "h - h_null" and meta["seed"] == 1
    other = json.loads((tmp_path / "h" / "head.json").read_text())  # the head on h, from the same features
    assert not other["calibrated"] and other["features"] == "h" and other["fit"]["heldout_table"] == meta["fit"]["heldout_table"]
    assert not torch.equal(VerdictHead.load(tmp_path / "h").weight, VerdictHead.load(out).weight)
    assert meta["target"]["hidden_size"] == 32 and meta["template"] == StepVerifier(
        tiny_llama(tok), tok).template
    assert set(meta["fit"]["heldout"]) >= {"auroc", "pair_accuracy", "n_pairs"}
    assert "python -m dreamr.calibrate" in meta["command"]
    pairs = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--data", str(gsm8k_file), "--out", str(pairs), "--limit", "3"]) == 0
    capsys.readouterr()
    result_path = tmp_path / "score.json"
    assert main(["score", "--target", str(folder), "--verdict-head", str(out), "--calibrate", "--pairs", str(pairs),
                 "--json", str(result_path), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(result_path.read_text())
    assert printed == written
    assert {"auroc", "pair_accuracy", "n_pairs", "mean_cpn_good", "mean_cpn_bad"} <= set(written)
    assert written["n_pairs"] == len(read_pairs(pairs)) and written["verifier"]["calibrate"]
    # --compare: every verifier from one extraction; a head fitted on h - h_null only with the null step
    fields = ("auroc", "pair_accuracy", "n_pairs", "mean_cpn_good", "mean_cpn_bad")
    for head_dir, names in ((out, {"target verdict", "target verdict, calibrated", "head, calibrated"}),
                            (tmp_path / "h", {"target verdict", "target verdict, calibrated", "head", "head, calibrated"})):
        assert main(["score", "--target", str(folder), "--verdict-head", str(head_dir), "--pairs", str(pairs),
                     "--compare", "--no-progress"] + (["--calibrate"] if head_dir == out else [])) == 0
        compared = json.loads(capsys.readouterr().out)
        assert set(compared["compare"]) == names
        chosen = compared["compare"]["head, calibrated" if head_dir == out else "head"]
        assert {k: chosen[k] for k in fields} == {k: compared[k] for k in fields}
    assert {k: compared["compare"]["head, calibrated"][k] for k in fields} != {k: written[k] for k in fields}
    # the target's own verdict, and a head refused for another target
    assert main(["score", "--target", str(folder), "--pairs", str(pairs), "--no-progress"]) == 0
    other = tmp_path / "other"
    tiny_llama(tok, seed=9, dtype=torch.float32).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(SystemExit):
        main(["score", "--target", str(other), "--verdict-head", str(out), "--pairs", str(pairs), "--no-progress"])
    assert "verdict_head" in capsys.readouterr().err
