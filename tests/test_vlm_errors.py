"""Bad image input gives a ValueError that names the argument and the value and says what to do."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tokenizer, tiny_qwen2
from dreamr.reasoner import SpeculativeReasoner
from vlm_models import qwen2_vl, random_image, vision_module

PROMPT = "How many clips did Natalia sell?"


@pytest.fixture(scope="module")
def vl_reasoner():
    model, processor = qwen2_vl(seed=0, layers=1)
    tok = build_tokenizer(330, reverse=True, bos=False)
    return SpeculativeReasoner(model, tiny_qwen2(tok), target_tokenizer=processor, draft_tokenizer=tok,
                               max_step_tokens=4, max_new_tokens=8)


def test_images_for_two_text_only_models_in_every_mode(reasoner):
    for mode, match in (("target", r"the target model .* is text-only .* and mode='target' runs it alone"),
                        ("draft", r"the draft model .* is text-only .* and mode='draft' runs it alone"),
                        ("speculative", r"the target model .* is text-only .* nor can the draft .* mode='speculative'"),
                        ("fpsr", r"the target model .* is text-only .* nor can the draft .* mode='fpsr'")):
        with pytest.raises(ValueError, match=r"images: 1 image\(s\) given but " + match):
            reasoner.generate(PROMPT, images=[random_image()], mode=mode)


def test_draft_mode_checks_the_draft_and_target_mode_the_target(vl_reasoner, tok_a, target_model):
    """Only the models the mode runs count: a text-only draft cannot take images alone (mode "draft"),
    a vision-language draft can, beside a text-only target that is never used."""
    with pytest.raises(ValueError, match=r"images: 1 image\(s\) given but the draft model \(Qwen2ForCausalLM\) is "
                                         r"text-only .* mode='draft' runs it alone; use a vision-language draft"):
        vl_reasoner.generate(PROMPT, images=[random_image()], mode="draft")
    assert vl_reasoner.generate(PROMPT, images=[random_image()], mode="target").steps
    draft, processor = qwen2_vl(seed=3, layers=1)
    r = SpeculativeReasoner(target_model, draft, target_tokenizer=tok_a, draft_tokenizer=processor,
                            max_step_tokens=4, max_new_tokens=8)
    calls = []
    handle = vision_module(draft).register_forward_hook(lambda *_: calls.append(1))
    try:
        seen = r.generate(PROMPT, images=[random_image(0)], mode="draft")
        assert calls == [1] and seen.steps  # the draft saw the image
        assert seen.text != r.generate(PROMPT, images=[random_image(1, (28, 56))], mode="draft").text
        # speculative: the draft sees the image (the target verifies the text); alpha 0 is the draft alone
        assert r.generate(PROMPT, images=[random_image(0)], mode="speculative", alpha=0.0).text == seen.text
    finally:
        handle.remove()
    with pytest.raises(ValueError, match=r"images\[0\]: 1 image\(s\) given but the target model \(LlamaForCausalLM\) "
                                         r"is text-only .* mode='target' runs it alone"):
        r.generate_batch([PROMPT], images=[[random_image()]], mode="target")


def test_unreadable_and_missing_paths(vl_reasoner, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is text, not a PNG")
    with pytest.raises(ValueError, match=r"images\[0\]=.*not_an_image\.png.*cannot be read as an image"):
        vl_reasoner.generate(PROMPT, images=[str(bad)])
    with pytest.raises(ValueError, match=r"images\[1\]=.*missing\.png.*no such image file"):
        vl_reasoner.generate(PROMPT, images=[random_image(), tmp_path / "missing.png"])


@pytest.mark.parametrize("image, match", [
    (12, r"images\[0\]: unsupported image type int; give a PIL image"),
    (b"\x89PNG", r"images\[0\]: unsupported image type bytes"),
    (torch.zeros(2, 8, 8), r"images\[0\]: an image tensor must be \[C, H, W\] .* got shape \(2, 8, 8\)"),
    (torch.full((3, 8, 8), 2.0), r"images\[0\]: a floating-point image tensor must hold finite values in \[0, 1\]"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), r"images\[0\]: an image tensor must be uint8 or floating point"),
])
def test_unsupported_images(vl_reasoner, image, match):
    with pytest.raises(ValueError, match=match):
        vl_reasoner.generate(PROMPT, images=[image])


def test_more_images_than_the_messages_have_places_for(vl_reasoner):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    with pytest.raises(ValueError, match=r"images: 2 image\(s\) given but the prompt's messages have 1 image part"):
        vl_reasoner.generate(messages, images=[random_image(0), random_image(1)])
    with pytest.raises(ValueError, match=r"images: 1 image\(s\) given but the prompt's messages have 0 image part"):
        vl_reasoner.generate([{"role": "user", "content": PROMPT}], images=[random_image(0)])
    with pytest.raises(ValueError, match=r"prompt\[0\]\['content'\]\[1\] is an image part with no image"):
        two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
        vl_reasoner.generate(two, images=[random_image(0)])
    with pytest.raises(ValueError, match=r"prompt\[0\]\['content'\]\[0\]: parts must be"):
        vl_reasoner.generate([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}])


def test_batch_names_the_request(vl_reasoner):
    with pytest.raises(ValueError, match=r"images must be a list with one entry per prompt \(2; .*got Image"):
        vl_reasoner.generate_batch([PROMPT, PROMPT], images=random_image())
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: unsupported image type int"):
        vl_reasoner.generate_batch([PROMPT, PROMPT], images=[[random_image()], [3]])


def test_batch_errors_name_the_entry(vl_reasoner):
    one_part = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    with pytest.raises(ValueError, match=r"^images\[1\]: 2 image\(s\) given but the prompts\[1\]'s messages have 1 "):
        vl_reasoner.generate_batch([PROMPT, one_part], images=[None, [random_image(0), random_image(1)]])
    with pytest.raises(ValueError, match=r"^prompts\[1\]: the target processor's chat template gives 2 image place"):
        vl_reasoner.generate_batch([PROMPT, "<|image_pad|>" + PROMPT], images=[None, [random_image()]])
    with pytest.raises(ValueError, match=r"^prompts\[1\]\[0\]\['content'\]\[1\] is an image part with no image, "
                                         r"and images\[1\] holds 1 image\(s\) for the parts without one"):
        two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
        vl_reasoner.generate_batch([PROMPT, two], images=[None, [random_image()]])


def test_a_text_only_draft_without_chat_template_reads_chat_messages_as_without_images():
    """Chat messages with images, for a text-only draft whose tokenizer has no chat template: the same
    ValueError as the same messages without images (not the messages' texts run together)."""
    model, processor = qwen2_vl(seed=0, layers=1)
    tok = build_tokenizer(330, reverse=True, bos=False)
    tok.chat_template = None
    r = SpeculativeReasoner(model, tiny_qwen2(tok), target_tokenizer=processor, draft_tokenizer=tok,
                            max_step_tokens=4, max_new_tokens=8)
    system = {"role": "system", "content": "Solve it step by step."}
    errors = []
    for user in ({"role": "user", "content": PROMPT},
                 {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}):
        with pytest.raises(ValueError, match=r"chat messages given but the draft tokenizer has no chat template") as e:
            r.generate([system, user], images=[random_image()] if user["content"] != PROMPT else None)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    # a string prompt with an image: the draft reads the string, as it would without the image
    request = r._request(PROMPT, [random_image()], r._config({}))
    assert request.draft_ids == r._request(PROMPT, None, r._config({})).draft_ids == tok.encode(PROMPT)


def test_a_vision_language_target_needs_its_processor(tok_b):
    model, processor = qwen2_vl(seed=0, layers=1)
    r = SpeculativeReasoner(model, tiny_qwen2(tok_b), target_tokenizer=processor.tokenizer, draft_tokenizer=tok_b,
                            max_step_tokens=4, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"target_tokenizer: .* was given a tokenizer .* not its processor"):
        r.generate(PROMPT, images=[random_image()])
    assert r.generate(PROMPT, mode="target").steps  # text alone still works


def test_placeholder_written_in_the_prompt_text(vl_reasoner):
    with pytest.raises(ValueError, match=r"prompt: the target processor's chat template gives 2 image place\(s\) "
                                         r"\('<\|image_pad\|>'\) for 1 image\(s\); do not write"):
        vl_reasoner.generate("<|vision_start|><|image_pad|><|vision_end|>" + PROMPT, images=[random_image()])
