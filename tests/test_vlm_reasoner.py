"""Vision-language targets and drafts through every mode, on tiny random Qwen2-VL, Qwen2.5-VL and LLaVA models.

- every mode generates with an image, for each family, beside a text-only draft and (Qwen2-VL) a
  vision-language draft; the vision encoder runs once per model per request whatever the number of
  steps, rejections and FPSR branches;
- target mode is transformers' own greedy ``generate`` on the processor's inputs;
- after every committed step (rollbacks included) each model's cache equals a fresh prefill of the
  image and the committed text, and its next-token logits equal the fresh prefill's;
- alpha = 1 and alpha = 0 give exactly the target-only and draft-only outputs with an image;
- a batch of requests with different images (different multimodal position offsets) and one without
  gives each request's own results, in FPSR too (rows of one batched cache).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from conftest import build_tokenizer, tiny_qwen2
from dreamr.cache import CachedSequence, ImagePrefix, cache_tensors
from dreamr.reasoner import SpeculativeReasoner
from vlm_models import llava, qwen2_5_vl, qwen2_vl, random_image, vision_module

PROMPT = "How many clips did Natalia sell altogether?"
MIXED = 0.5  # with the content judge (conftest), about half the drafted steps are accepted
MODES = ["target", "draft", "token", "speculative", "fpsr"]


@pytest.fixture(scope="module")
def qwen_vl():
    return qwen2_vl(seed=0)


@pytest.fixture(scope="module")
def llava_vl():
    return llava(seed=0)


@pytest.fixture(scope="module")
def text_draft():
    tok = build_tokenizer(330, reverse=True, bos=False)
    return tiny_qwen2(tok), tok


@pytest.fixture(scope="module", params=["qwen2_vl+text_draft", "llava+text_draft", "qwen2_vl+qwen2_vl_draft",
                                        "qwen2_5_vl+qwen2_5_vl_draft"])
def pair(request, qwen_vl, llava_vl, text_draft):
    """A reasoner and its vision-language models (target, and the draft where it sees images)."""
    kw = dict(max_step_tokens=5, max_new_tokens=24, draft_policy="always")  # every step drafted and judged
    if request.param == "qwen2_vl+qwen2_vl_draft":
        model, processor = qwen_vl
        draft, _ = qwen2_vl(seed=3, layers=1)
        r = SpeculativeReasoner(model, draft, target_tokenizer=processor, draft_tokenizer=processor, **kw)
        return r, [model, draft]
    if request.param == "qwen2_5_vl+qwen2_5_vl_draft":
        model, processor = qwen2_5_vl(seed=0)
        draft, _ = qwen2_5_vl(seed=3, layers=1)
        r = SpeculativeReasoner(model, draft, target_tokenizer=processor, draft_tokenizer=processor, **kw)
        return r, [model, draft]
    model, processor = qwen_vl if request.param.startswith("qwen") else llava_vl
    r = SpeculativeReasoner(model, text_draft[0], target_tokenizer=processor, draft_tokenizer=text_draft[1], **kw)
    return r, [model]


class VisionCalls:
    """Counts forward calls of each model's vision encoder."""

    def __init__(self, models):
        self.counts = {id(m): 0 for m in models}
        self.handles = [vision_module(m).register_forward_hook(self._hook(id(m))) for m in models]

    def _hook(self, key):
        def hook(*_):
            self.counts[key] += 1
        return hook

    def reset(self):
        self.counts = {k: 0 for k in self.counts}

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def vision_calls(pair):
    calls = VisionCalls(pair[1])
    yield calls
    calls.remove()


def steps_of(result):
    return [(s.text, s.source, s.cpn, s.accepted, s.num_tokens) for s in result.steps]


def structure(result):
    return [(s.text, s.num_tokens) for s in result.steps]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_with_an_image_encodes_it_once_per_model(pair, mode, vision_calls, content_judge):
    r, vlms = pair
    content_judge(r)
    if mode == "draft" and not r.draft.vision:  # the text-only draft alone cannot see the image
        with pytest.raises(ValueError, match=r"images: 1 image\(s\) given but the draft model .* is text-only .* "
                                             r"mode='draft' runs it alone"):
            r.generate(PROMPT, images=[random_image(0)], mode=mode)
        assert not any(vision_calls.counts.values())
        return
    if mode == "fpsr":
        r.engine("fpsr").target_launch = "eager"  # fallback branches for every slot: many target rows
    try:
        result = r.generate(PROMPT, images=[random_image(0)], mode=mode, alpha=MIXED)
    finally:
        r.engine("fpsr").target_launch = "auto"
    assert len(result.steps) >= 3 and result.text
    users = {"target": [r.target.model], "token": [r.target.model], "draft": [r.draft.model]}.get(
        mode, [r.target.model, r.draft.model])
    for m in vlms:
        assert vision_calls.counts[id(m)] == (1 if m in users else 0), (mode, vision_calls.counts)
    if mode in ("speculative", "fpsr"):
        assert {s.source for s in result.steps} == {"draft", "target"}  # acceptances and rejections
    if mode == "fpsr":
        stats = r.engine("fpsr").last_stats
        assert stats["branch_forwards"] > 0  # batched target branches ran on the image prefix
    # a second request encodes its image again (once), a batch of two once each
    vision_calls.reset()
    r.generate_batch([PROMPT, PROMPT], images=[[random_image(1)], [random_image(2, (28, 28))]], mode=mode,
                     alpha=MIXED)
    for m in vlms:
        assert vision_calls.counts[id(m)] == (2 if m in users else 0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_target_mode_is_transformers_generate_on_the_image(family, qwen_vl, llava_vl, text_draft):
    model, processor = {"qwen2_vl": qwen_vl, "llava": llava_vl}.get(family) or qwen2_5_vl(seed=0)
    r = SpeculativeReasoner(model, text_draft[0], target_tokenizer=processor, draft_tokenizer=text_draft[1],
                            max_step_tokens=5, max_new_tokens=16)
    image = random_image(4)
    seen = {}
    r.engine("target").observer = lambda t, d: seen.update(ids=list(t.ids))
    try:
        result = r.generate(PROMPT, images=[image], mode="target")
    finally:
        r.engine("target").observer = None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=result.metrics.target_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    if hasattr(model.base_model, "rope_deltas"):
        model.base_model.rope_deltas = None
    assert seen["ids"] == out[0].tolist() and result.metrics.target_tokens == 16  # same tokens (steps decode
    # their own text, so a character split across two steps decodes differently: compare ids)


def _fresh(model, prompt_inputs, ids):
    """A fresh full forward of the image prompt and ``ids`` after it: ``(cache, last logits [V])``."""
    P = prompt_inputs["input_ids"].shape[1]
    assert ids[:P] == prompt_inputs["input_ids"][0].tolist()
    kw = {k: v for k, v in prompt_inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in prompt_inputs:
        tt = prompt_inputs["mm_token_type_ids"]
        kw["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(1, len(ids) - P)], dim=1)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, **kw)
    if hasattr(model.base_model, "rope_deltas"):
        model.base_model.rope_deltas = None
    return cache, out.logits[0, -1]


def _assert_cache_prefix(cache_kv, fresh_cache, n):
    fresh = cache_tensors(fresh_cache)
    assert len(fresh) == len(cache_kv)
    for got, want in zip(cache_kv, fresh):
        torch.testing.assert_close(got[:, :, :n], want[:, :, :n], atol=1e-9, rtol=0)


def _check_sequence(seq: CachedSequence, inputs):
    """``seq``'s cache equals a fresh prefill, and its next-token logits the fresh ones (on a copy)."""
    fresh_cache, want = _fresh(seq.model, inputs, seq.ids)
    assert seq.cached >= inputs["input_ids"].shape[1] - 1  # the image prefix never left the cache
    _assert_cache_prefix(cache_tensors(seq.cache), fresh_cache, seq.cached)
    probe = CachedSequence(seq.model, seq.ids, prefix=ImagePrefix(seq.ids[:seq.cached + 1], copy.deepcopy(seq.cache),
                                                                  seq.position_offset, 0.0))
    torch.testing.assert_close(probe.next_logits(), want, atol=1e-9, rtol=0)


def _check_row(row, model, inputs):
    """An FPSR row (of a batched ragged cache) equals a fresh prefill of its ids; so do its next logits."""
    kv = row.batch.dense(row, row.cached)
    fresh_cache, want = _fresh(model, inputs, row.ids)
    _assert_cache_prefix([t for pair in kv for t in pair], fresh_cache, row.cached)
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    probe = CachedSequence(model, row.ids, prefix=ImagePrefix(row.ids[:row.cached + 1], cache, row.offset, 0.0))
    torch.testing.assert_close(probe.next_logits(), want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", ["speculative", "fpsr"])
def test_caches_after_rollback_equal_a_fresh_prefill_of_image_and_text(pair, mode, content_judge):
    r, _ = pair
    content_judge(r)
    image = random_image(5)
    request = r._request(PROMPT, [image], r._config({"mode": mode}))
    checked = []

    def observer(t, d):
        for lm, seq, inputs in ((r.target, t, request.target_inputs), (r.draft, d, request.draft_inputs)):
            if inputs is None:
                continue  # the text-only draft: covered by the text tests
            if mode == "fpsr":
                _check_row(seq, lm.model, inputs)
            else:
                _check_sequence(seq, inputs)
        checked.append(1)

    engine = r.engine(mode)
    engine.observer = observer
    if mode == "fpsr":
        engine.target_launch = "eager"
    try:
        result = r.generate(PROMPT, images=[image], mode=mode, alpha=MIXED)
    finally:
        engine.observer = None
        if mode == "fpsr":
            engine.target_launch = "auto"
    assert {s.source for s in result.steps} == {"draft", "target"}  # rollbacks happened
    assert len(checked) == len(result.steps)


@pytest.mark.parametrize("mode", ["speculative", "fpsr"])
def test_alpha_ends_are_target_only_and_draft_only_with_an_image(pair, mode):
    r, _ = pair
    images = [random_image(6)]
    target_only = r.generate(PROMPT, images=images, mode="target")
    # a text-only draft drafts from the prompt's text: the prompt as one user message, without the image
    draft_only = r.generate(PROMPT, images=images, mode="draft") if r.draft.vision else \
        r.generate([{"role": "user", "content": PROMPT}], mode="draft")
    none = r.generate(PROMPT, images=images, mode=mode, alpha=1.0)
    every = r.generate(PROMPT, images=images, mode=mode, alpha=0.0)
    assert none.text == target_only.text and structure(none) == structure(target_only)
    assert all(s.source == "target" for s in none.steps)
    assert every.text == draft_only.text and structure(every) == structure(draft_only)
    assert all(s.source == "draft" for s in every.steps)
    # the image matters to the target: another image gives another target-only text
    assert r.generate(PROMPT, images=[random_image(7, (28, 56))], mode="target").text != target_only.text


def test_fpsr_batch_with_different_images_equals_single_requests(pair, content_judge):
    """Rows of different requests (different rotary offsets, one without an image) share FPSR's batches."""
    r, _ = pair
    content_judge(r)
    prompts = [PROMPT, "Natalia sold clips to 48 of her friends in April.", PROMPT]
    images = [[random_image(8)], None, [random_image(9, (28, 28)), random_image(10, (56, 28))]]
    engine = r.engine("fpsr")
    engine.target_launch = "eager"
    try:
        batch = r.generate_batch(prompts, images=images, mode="fpsr", alpha=MIXED)
    finally:
        engine.target_launch = "auto"
    single = [r.generate(p, images=im, mode="speculative", alpha=MIXED) for p, im in zip(prompts, images)]
    assert [steps_of(b) for b in batch] == [steps_of(s) for s in single]


def test_chat_messages_with_image_parts(pair):
    r, _ = pair
    image = random_image(11)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
    a = r.generate(messages, mode="target")
    b = r.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                   images=[image], mode="target")
    c = r.generate(PROMPT, images=image, mode="target")  # one image, not in a list
    assert a.text == b.text == c.text


def test_image_from_a_path_and_a_tensor_equal_the_pil_image(pair, tmp_path):
    r, _ = pair
    image = random_image(12)
    path = tmp_path / "img.png"
    image.save(path)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
    texts = {r.generate(PROMPT, images=[x], mode="target").text for x in (image, str(path), path, tensor,
                                                                           tensor.double() / 255.0)}
    assert len(texts) == 1


def test_text_requests_on_a_vision_language_target_after_an_image_request(pair):
    """A text-only request right after an image request is not shifted by the earlier image's positions."""
    r, _ = pair
    before = r.generate(PROMPT, mode="target").text
    r.generate(PROMPT, images=[random_image(13)], mode="target")
    assert r.generate(PROMPT, mode="target").text == before


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_image_sequence_rollback_equals_fresh_prefill(family, qwen_vl, llava_vl):
    """Decode, roll back inside the text, decode again: logits equal a fresh prefill; the prefix stays."""
    from dreamr.cache import encode_prefix
    from dreamr.multimodal import prepare_prompt, processor_inputs

    model, processor = qwen_vl if family == "qwen2_vl" else llava_vl
    inputs = processor_inputs(processor, prepare_prompt(PROMPT, [random_image(14)]), "target")
    prefix = encode_prefix(model, inputs)
    P = len(prefix.ids)
    seq = CachedSequence(model, prefix.ids, prefix=prefix)
    for _ in range(6):
        seq.extend([int(torch.argmax(seq.next_logits()))])
    _check_sequence(seq, inputs)
    for keep in (P + 4, P + 1, P, P + 2):
        if keep > len(seq.ids):
            seq.extend([7] * (keep - len(seq.ids)))
        seq.truncate(keep)
        _check_sequence(seq, inputs)
        seq.extend([int(torch.argmax(seq.next_logits()))])
        _check_sequence(seq, inputs)
    with pytest.raises(ValueError, match="image prefix"):
        seq.truncate(P - 2)
