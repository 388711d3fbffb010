"""SAPO on rows with an image path: a vision-language draft, or a text-only draft beside a vision-language
target (tiny random Qwen2-VL models, CPU, float64)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tokenizer, tiny_qwen2
from dreamr.config import ReasonerConfig
from training import SAPOConfig, SAPOTrainer
from training.data import load_jsonl
from vlm_models import qwen2_vl, random_image, vision_module

QUESTIONS = [("How many clips did Natalia sell altogether?", "#### 12"),
             ("Natalia sold clips to 48 of her friends in April.", "#### 72")]


@pytest.fixture
def image_data(tmp_path):
    """A JSONL file: one row with a relative image path, one with a list of two images, one text row."""
    (tmp_path / "img").mkdir()
    random_image(0).save(tmp_path / "img" / "a.png")
    random_image(1, (28, 56)).save(tmp_path / "img" / "b.png")
    rows = [{"question": QUESTIONS[0][0], "answer": QUESTIONS[0][1], "image": "img/a.png"},
            {"question": QUESTIONS[1][0], "answer": QUESTIONS[1][1], "images": ["img/b.png", "img/a.png"]},
            {"question": QUESTIONS[0][0], "answer": "12"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(**kw):
    base = dict(group_size=2, batch_prompts=3, micro_batch_prompts=3, total_steps=1, lr=1e-2,
                reasoner=ReasonerConfig(temperature=1.0, max_new_tokens=6),
                dtype="float64", length_max_tokens=6, length_max_steps=1, shuffle=False, beta=0.04)
    base.update(kw)
    return SAPOConfig(**base)


class Calls:
    def __init__(self, model):
        self.n = 0
        self.handle = vision_module(model).register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_data_resolves_image_paths(image_data):
    data = load_jsonl(image_data)
    assert data.image_rows == 2 and not hasattr(data, "ignored_images")
    assert data[0].images == (str(image_data.parent / "img" / "a.png"),)
    assert len(data[1].images) == 2 and data[2].images == () and not data[2].has_image
    bad = image_data.parent / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1", "images": [3]}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: 'images' must be an image path or a list of paths, got \[3\]"):
        load_jsonl(bad)


def test_vision_language_draft_and_target_train_on_image_rows(image_data):
    draft, d_proc = qwen2_vl(seed=3, layers=1)
    target, t_proc = qwen2_vl(seed=0, layers=1)
    d_calls, t_calls = Calls(draft), Calls(target)
    tr = SAPOTrainer(draft, d_proc, target, t_proc, data=load_jsonl(image_data), config=config(), progress=False)
    assert tr.vision.draft_sees and tr.vision.target_sees and tr.vision.unseen_image_rows == 0
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    rollouts = [tr.rollout(tr.data[i], 0, i) for i in range(3)]
    image_id = d_proc.image_token_id
    assert image_id in rollouts[0].prompt_ids and rollouts[1].prompt_ids.count(image_id) > 0
    assert image_id not in rollouts[2].prompt_ids and rollouts[2].vision_inputs is None
    assert d_calls.n == 2  # one generate per image row (G rows batched), the vision tower once each
    verified_rows = sum(1 for r in rollouts[:2] if any(r.cpns))
    assert t_calls.n == verified_rows > 0  # the target encodes a row's image once for all its completions
    # the batched, padded log-probabilities (image and text rows together) equal each row alone
    with torch.no_grad():
        together = tr._logps(tr.model, tr._batch(rollouts))
        alone = [row for r in rollouts for row in tr._logps(tr.model, tr._batch([r]))]
    mask = tr._batch(rollouts)[3].bool()
    assert len(alone) == together.shape[0] == 6
    for i, row in enumerate(alone):
        n = int(mask[i].sum())
        torch.testing.assert_close(together[i, :n], row[:n], atol=1e-9, rtol=0)
    # a row's log-probabilities depend on its image: without it they differ
    r0 = rollouts[0]
    with torch.no_grad():
        blind = tr._logps(tr.model, tr._batch([r0])[:5])
    assert not torch.allclose(blind, torch.stack(alone[:2]))
    for r in rollouts:
        r.rewards = [1.0, 0.0]  # unequal rewards in each group: a policy gradient through the image rows
    tr.optimize(rollouts)
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_text_only_draft_with_a_vision_language_target(image_data, tmp_path):
    tok = build_tokenizer(330, reverse=True, bos=False)
    target, t_proc = qwen2_vl(seed=0, layers=1)
    t_calls = Calls(target)
    tr = SAPOTrainer(tiny_qwen2(tok), tok, target, t_proc, data=load_jsonl(image_data), config=config(),
                     progress=False, out_dir=tmp_path / "out")
    assert not tr.vision.draft_sees and tr.vision.target_sees
    ro = tr.rollout(tr.data[0], 0, 0)
    assert ro.vision_inputs is None and ro.prompt_ids == tr.prompt_ids(QUESTIONS[0][0])  # the draft reads text
    assert sum(1 for c in ro.cpns if c) > 0 and t_calls.n == 1  # each verification sees the image, encoded once
    # the target's verdicts with the image differ from its verdicts on the text alone
    text_only = tr.reward.draft.scorer.score(QUESTIONS[0][0], ["Step 1: 4.\n\n"])
    seen = tr.reward.draft.scorer.score(QUESTIONS[0][0], ["Step 1: 4.\n\n"], images=[random_image(0)])
    assert text_only != seen
    tr.train()
    assert (tmp_path / "out" / "config.json").is_file()


def test_missing_image_file_fails_before_training(image_data):
    lines = image_data.read_text().splitlines()
    lines[0] = lines[0].replace("img/a.png", "img/missing.png")
    image_data.write_text("\n".join(lines) + "\n")
    target, t_proc = qwen2_vl(seed=0, layers=1)
    tok = build_tokenizer(330, reverse=True, bos=False)
    with pytest.raises(ValueError, match=r"row 1: image=.*missing\.png.* is not a file"):
        SAPOTrainer(tiny_qwen2(tok), tok, target, t_proc, data=load_jsonl(image_data), config=config(),
                    progress=False)
    with pytest.raises(ValueError, match=r"target_tokenizer: the target is a vision-language model but was given a "
                                         r"tokenizer"):
        SAPOTrainer(tiny_qwen2(tok), tok, target, t_proc.tokenizer, data=load_jsonl(image_data), config=config(),
                    progress=False)


def test_script_trains_a_vision_language_draft_on_image_rows(image_data, tmp_path, capsys):
    from dreamr import models
    from training.train_sapo import main as script_main

    for name, seed in (("target", 0), ("draft", 3)):
        model, processor = qwen2_vl(seed=seed, layers=1)
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    args = ["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--data", str(image_data),
            "--out", str(tmp_path / "out"), "-G", "2", "--max-new-tokens", "4", "--steps", "1", "--save-every", "1"]
    assert script_main(args) == 0
    assert "images ignored" not in capsys.readouterr().out
    trained = models.load(tmp_path / "out")
    assert trained.processor is not None and type(trained.model).__name__ == "Qwen2VLForConditionalGeneration"


def test_scorer_encodes_an_image_prompt_once_for_consecutive_calls():
    """The draft reward scores a row's G completions one call each: the image prefix is encoded once and
    each call gets its own copy, so the scores equal those of a scorer that encodes it every time."""
    from dreamr.verify import StepVerifier
    from training.scoring import StepScorer

    target, t_proc = qwen2_vl(seed=0, layers=1)
    calls = Calls(target)
    prompt, image = QUESTIONS[0][0], random_image(0)
    completions = [["Step 1: 4.\n\n", "The answer is 12."], ["Step 1: 3 + 9.\n\n"],
                   ["So 12.\n\n", "Step 2: 7.\n\n", "The answer is 7."]]

    def fresh(steps, images, text=prompt):
        return StepScorer(StepVerifier(target, t_proc)).score(text, steps, images=images)

    v = StepScorer(StepVerifier(target, t_proc))
    assert v.verifier.tokenizer is t_proc.tokenizer and v.verifier.processor is t_proc
    reused = [v.score(prompt, steps, images=[image]) for steps in completions]
    assert calls.n == 1
    calls.n = 0
    assert reused == [fresh(steps, [image]) for steps in completions] and calls.n == 3
    calls.n = 0
    other = random_image(1, (28, 56))  # another image (or prompt) is encoded anew
    assert v.score(prompt, completions[0], images=[other]) == fresh(completions[0], [other])
    assert calls.n == 2
    text = "What is 2 + 2?"
    assert v.score(text, completions[0], images=[other]) == fresh(completions[0], [other], text)
    assert calls.n == 4
    calls.n = 0
    with torch.no_grad():  # weights updated in place (an optimizer step): the kept prefix is stale
        next(p for n, p in target.named_parameters() if "visual" in n).mul_(1.5)
    assert v.score(prompt, completions[0], images=[image]) == fresh(completions[0], [image])
    assert calls.n == 2
    calls.handle.remove()


def test_mixed_batch_gives_every_per_token_input_a_row_per_batch_row():
    """A text rollout beside an image rollout whose processor emits another per-token input
    (``token_type_ids``, as Gemma 3's does): zero rows for the text rows, the prompt's values for the
    image rows, padded to the batch width."""
    from dreamr.multimodal import prepare_prompt, processor_inputs
    from training.vision import VisionData

    _, processor = qwen2_vl(seed=0, layers=1)
    inputs = processor_inputs(processor, prepare_prompt(QUESTIONS[0][0], [random_image(0)]), "draft")
    P = inputs["input_ids"].shape[1]
    inputs["token_type_ids"] = torch.arange(1, P + 1).unsqueeze(0)
    width = P + 7
    out = VisionData.batch_kwargs([(None, 3, 5), (inputs, 2, P)], width, "cpu")
    assert out["token_type_ids"].shape == out["mm_token_type_ids"].shape == (5, width)
    assert out["token_type_ids"][:3].eq(0).all() and out["mm_token_type_ids"][:3].eq(0).all()
    for row in (3, 4):
        assert out["token_type_ids"][row, :P].tolist() == list(range(1, P + 1))
        assert out["token_type_ids"][row, P:].eq(0).all()
        assert out["mm_token_type_ids"][row, :P].tolist() == inputs["mm_token_type_ids"][0].tolist()
    assert out["pixel_values"].shape[0] == 2 * inputs["pixel_values"].shape[0]  # per image, the image rows only
    assert torch.equal(out["image_grid_thw"], inputs["image_grid_thw"].repeat(2, 1))


def test_vision_language_draft_inputs_are_checked(image_data):
    """The draft's processor inputs come through dreamr.multimodal.processor_inputs, with its checks."""
    from training.data import draft_messages
    from training.vision import VisionData

    draft, d_proc = qwen2_vl(seed=3, layers=1)
    data = load_jsonl(image_data)
    vision = VisionData(data, draft, d_proc, None, None)
    ok = vision.draft_inputs(data[0], draft_messages(data[0].question, None, 1))
    assert ok["input_ids"][0].tolist().count(d_proc.image_token_id) > 0 and "pixel_values" in ok
    with pytest.raises(ValueError, match=r"question: the draft processor's chat template gives 2 image place"):
        vision.draft_inputs(data[0], draft_messages("<|image_pad|>" + data[0].question, None, 1))
    assert vision.draft_inputs(data[2], draft_messages(data[2].question, None, 0)) is None  # a text row
