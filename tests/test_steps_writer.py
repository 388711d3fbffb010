"""dreamr.steps.StepWriter: the same step ends and text as decoding the whole step after every token, for
tail-local tokenizers (decoded only where a token can end the step) and every other tokenizer (plain)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dreamr.steps import StepWriter, ends_step, tail_local

# A SentencePiece-style vocabulary with byte fallback (as Gemma's): pieces with "▁" for a space, newline
# pieces, and raw byte tokens, among them a newline byte and the three bytes of "€" (E2 82 AC).
PIECES = ["<unk>", "<eos>", "▁The", "▁sum", "▁is", "▁4", ".", "\n", "\n\n", ".\n\n", "▁", "a", "b", "é",
          "€", " \n", "Step", ":", "<0x0A>", "<0xE2>", "<0x82>", "<0xAC>", "<0x20>", "<0x41>"]


def _sentencepiece_tokenizer(decoder) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(PIECES)}, [], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def gemma_style():
    return _sentencepiece_tokenizer(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                       decoders.Fuse()]))


def llama2_style():
    return _sentencepiece_tokenizer(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)]))


def metaspace_style():
    return _sentencepiece_tokenizer(decoders.Metaspace())


def joined_replace():
    """Not tail-local: a Replace after the join turns "ab" (two tokens without a newline) into a blank line."""
    return _sentencepiece_tokenizer(decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "\n\n")]))


def word_piece():
    """Not tail-local for this module: a decoder it does not know (WordPiece joins "##" pieces and cleans
    up spaces before punctuation)."""
    return _sentencepiece_tokenizer(decoders.WordPiece())


class ReversingTokenizer(PreTrainedTokenizerFast):
    """Not tail-local: its own decode post-processes the whole text."""

    def decode(self, token_ids, **kwargs):
        return super().decode(token_ids, **kwargs)[::-1]


def reference(tokenizer, eos_ids, delimiter, max_tokens, tokens):
    """The definition: decode the whole step after every token (the step writer before it skipped decodes)."""
    ids, ends, text = [], [], ""
    for t in tokens:
        ids.append(t)
        if t in eos_ids:
            ends.append("eos")
            break
        text = tokenizer.decode(ids, skip_special_tokens=True)
        end = "delimiter" if ends_step(text, delimiter) else ("cap" if len(ids) >= max_tokens else None)
        ends.append(end)
        if end is not None:
            break
    return ends, ids, text


def written(tokenizer, eos_ids, delimiter, max_tokens, tokens):
    w = StepWriter(tokenizer, eos_ids, delimiter, max_tokens)
    ends = []
    for t in tokens:
        ends.append(w.add(t))
        if w.end is not None:
            break
    return ends, w.ids, w.text


def _check_random_steps(tokenizer, delimiters, seed=0, n=300, pool=None):
    rng = random.Random(seed)
    pool = list(pool) if pool is not None else list(range(len(tokenizer)))
    chars = set("".join(delimiters))
    # tokens with delimiter characters drawn more often, so that many steps end at a delimiter
    pool += [t for t in set(pool) if chars & set(tokenizer.decode([t], skip_special_tokens=True))] * 10
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    checked = 0
    for i in range(n):
        tokens = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        delimiter = delimiters[i % len(delimiters)]
        cap = rng.choice([3, 16, 64, 64])
        want = reference(tokenizer, eos, delimiter, cap, tokens)
        assert written(tokenizer, eos, delimiter, cap, tokens) == want, (tokens, delimiter, cap)
        checked += want[0][-1] == "delimiter"
    assert checked > n // 10  # enough of the steps end at a delimiter for the comparison to mean something


@pytest.mark.parametrize("build", [gemma_style, llama2_style, metaspace_style])
def test_sentencepiece_styles_are_tail_local_and_end_steps_as_full_decoding(build):
    tok = build()
    assert tail_local(tok)
    _check_random_steps(tok, ["\n\n", "\n", ". ", "Step", " "])


def test_byte_tokens_that_decode_with_their_neighbours_end_steps_as_full_decoding():
    tok = gemma_style()
    ids = {p: i for i, p in enumerate(PIECES)}
    eos = {tok.eos_token_id}
    # "\n" as a byte token, then a byte run that is invalid UTF-8 until its last byte: the run decodes
    # as a whole, so the earlier newline shows, vanishes and shows again with tokens that hold none
    for seq in (["▁The", "<0x0A>", "<0x0A>"], ["a", "<0x0A>", "<0xE2>", "<0x0A>", "<0x82>", "<0xAC>"],
                ["a", "\n", "<0xE2>", "\n", "b"], ["a", "<0x0A>", "<0x82>", "<0x0A>", "<0x41>"]):
        tokens = [ids[p] for p in seq]
        for delimiter in ("\n\n", "\n", "\nA"):
            want = reference(tok, eos, delimiter, 64, tokens)
            assert written(tok, eos, delimiter, 64, tokens) == want, (seq, delimiter)


def test_byte_level_bpe_is_tail_local_and_ends_steps_as_full_decoding(tok_a):
    assert tail_local(tok_a)
    text = "Step 1: 2 + 2 = 4.\n\nStep 2: é € 😀 done.\n\n\n x"
    pool = sorted(set(tok_a.encode(text, add_special_tokens=False)) | set(range(len(tok_a))))
    _check_random_steps(tok_a, ["\n\n", "\n", ":\n"], pool=pool)


@pytest.mark.parametrize("build", [joined_replace, word_piece])
def test_other_decoders_decode_every_token(build):
    tok = build()
    assert not tail_local(tok)
    _check_random_steps(tok, ["\n\n", " "], n=150)


def test_a_decode_of_its_own_is_not_tail_local():
    base = gemma_style()
    tok = ReversingTokenizer(tokenizer_object=base.backend_tokenizer, eos_token="<eos>", unk_token="<unk>")
    assert not tail_local(tok)
    _check_random_steps(tok, ["\n\n"], n=100)


def test_a_joined_replace_ends_a_step_at_a_token_without_the_delimiter():
    """Why such decoders take the plain path: "b" holds no newline, yet it ends the step."""
    tok = joined_replace()
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    assert "\n" not in tok.decode([b, b])
    assert written(tok, {tok.eos_token_id}, "\n\n", 64, [a, a, b]) == ([None, None, "delimiter"], [a, a, b], "a\n\n")


def test_decodes_only_at_tokens_that_can_end_the_step(tok_a, monkeypatch):
    ids = tok_a.encode("Step 1: two and two make four, and four and four make eight.\n\nNext", add_special_tokens=False)
    newline = next(i for i, t in enumerate(ids) if "\n" in tok_a.decode([t]))
    # tail_local is looked up (and cached for this tokenizer object) before decode is wrapped below
    warm = StepWriter(tok_a, set(), "\n\n", 100)
    for t in ids:
        warm._may_end(t)  # a token id seen for the first time is looked up once (a decode of [t, t])
    calls = []
    plain = type(tok_a).decode

    def counting(self, token_ids, **kwargs):
        calls.append(len(token_ids))
        return plain(self, token_ids, **kwargs)

    monkeypatch.setattr(type(tok_a), "decode", counting)
    w = StepWriter(tok_a, set(), "\n\n", 100)
    ends = [w.add(t) for t in ids[:newline + 2]]
    assert ends[-1] == "delimiter" and all(e is None for e in ends[:-1]) and w.text.endswith("\n\n")
    assert newline > 10 and len(calls) <= 2  # the newline token(s) only, not one decode per token

    # a delimiter ending in a non-ASCII character: the plain path, one decode per token
    w = StepWriter(tok_a, set(), "。", 100)
    calls.clear()
    for t in ids[:10]:
        w.add(t)
    assert len(calls) == 10


def test_text_is_the_decoded_step_without_a_final_eos(tok_a):
    eos = {tok_a.eos_token_id}
    ids = tok_a.encode("The sum is 4", add_special_tokens=False)
    w = StepWriter(tok_a, eos, "\n\n", 100)
    for t in ids:
        assert w.add(t) is None
        assert w.text == tok_a.decode(w.ids, skip_special_tokens=True)  # readable mid-step (FPSR reads it)
    assert w.add(tok_a.eos_token_id) == "eos" and w.text == "The sum is 4" and w.content_ids == ids
    w = StepWriter(tok_a, eos, "\n\n", 100)
    assert w.add(tok_a.eos_token_id) == "eos" and w.text == "" and w.content_ids == []


def _real_tokenizer(name):
    from dreamr import models

    folder = models.converted_path(name)
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"{name} is not converted on this machine (run python -m dreamr once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_the_default_pair_tokenizers_are_tail_local_and_end_steps_as_full_decoding(name):
    tok = _real_tokenizer(name)
    assert tail_local(tok)
    text = ("Janet's ducks lay 16 eggs per day.\n\nShe eats 3 — so 16 - 3 = 13 eggs € 2 each.\n \n"
            "The answer is 26.\n\n\n😀 é\t\n\n")
    common = tok.encode(text, add_special_tokens=False)
    rng = random.Random(1)
    # the text's tokens, byte tokens and specials, and a sample of the whole vocabulary
    extra = [i for i in range(min(len(tok), 400))] + rng.sample(range(len(tok)), 400)
    _check_random_steps(tok, ["\n\n", "\n", ". "], pool=common * 4 + extra, n=120)
