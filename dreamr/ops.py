"""dreamr's compiled ops: CPN verification, window acceptance, KV-cache rollback and compaction, speculative
sampling.

Each op is a ``torch.ops.dreamr.*`` operator registered from ``csrc/bindings.cpp`` with a CPU kernel and,
where torch was built with CUDA, a CUDA kernel. The functions here are typed wrappers that turn Python
conveniences (lists, seeds, generators) into the operator's arguments. Checking is split in two, and
every failure is a ``ValueError`` naming the argument: the wrappers check the Python arguments (types of
scalars and id lists, and that all tensors share one device, so that a ``meta`` tensor next to a real
one cannot silently reach the fake implementation), the C++ launchers check shapes, dtypes, layouts
and, on the CPU, values. Values held in CUDA tensors (token ids, uniforms, rollback and compaction plans) are *not*
checked: reading them would synchronise with the host; each op's docstring says what then happens.
Calling ``torch.ops.dreamr.*`` directly skips the wrapper checks. Each op also has a fake (meta)
implementation, so it traces under ``torch.compile``; the CUDA paths never synchronise with the host,
so they can be captured in CUDA graphs. :mod:`dreamr.reference` holds the plain PyTorch definitions.
"""

from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence, Union

import torch

from dreamr._extension import load_extension

load_extension()

__all__ = [
    "MAX_CACHE_TENSORS",
    "MAX_VERDICT_IDS",
    "cpn_verify",
    "cpn_window_accept",
    "kv_rollback",
    "kv_compact",
    "speculative_sample",
    "greedy_verify",
]

_IntsOrTensor = Union[Sequence[int], torch.Tensor]

#: Largest number of cache tensors (keys and values of all layers) one :func:`kv_rollback` or
#: :func:`kv_compact` call takes;
#: they travel to the CUDA kernel by value (csrc/include/dreamr/common.h, kMaxCacheTensors).
MAX_CACHE_TENSORS = 256
#: Largest number of token ids in each verdict set of :func:`cpn_verify` (kMaxVerdictIds).
MAX_VERDICT_IDS = 64


# Argument checks on the Python side. They read types, shapes, dtypes and devices only, never the values
# of a device tensor, so they add no host synchronisation.
def _check_tensors(op: str, named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> Optional[torch.device]:
    """Every given argument is a Tensor and all are on one device (which is returned)."""
    first_name, device = None, None
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but the other inputs are on {device} ({first_name} is); all "
                f"tensors must be on one device: move it with .to({str(device)!r})"
            )
    return device


def _real(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: {name} must be a real number (a Python float), got {type(value).__name__} {value!r}")
    return float(value)


def _index(op: str, name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}") from None


def _int_list(op: str, name: str, values: object) -> list[int]:
    """A sequence of ints (or a 1-D integer CPU tensor) as a list; floats, bools and nesting are refused."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(
                f"{op}: {name} is a tensor on {values.device}; pass a list of ints or a CPU tensor (reading a "
                "device tensor's values would synchronise with the host)"
            )
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(
                f"{op}: {name} must be a 1-D integer tensor or a sequence of ints, got a tensor of shape "
                f"{tuple(values.shape)} and dtype {values.dtype}"
            )
        return values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{op}: {name} must be a sequence of ints, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.dtype == torch.bool:  # operator.index takes a bool tensor
            raise ValueError(f"{op}: {name}[{i}] must be an int, got bool {v!r}")
        out.append(_index(op, f"{name}[{i}]", v))
    return out


def _cache_list(op: str, cache: object) -> list[torch.Tensor]:
    """The cache tensors as a non-empty list (their shapes, layouts and devices are checked by the op)."""
    if isinstance(cache, torch.Tensor) or not hasattr(cache, "__len__"):
        raise ValueError(f"{op}: cache must be a list of tensors (keys and values of every layer), got "
                         f"{type(cache).__name__}")
    cache = list(cache)
    if len(cache) == 0:
        raise ValueError(f"{op}: cache is empty; pass the keys and values of every layer")
    return cache


def _to_device(values: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host int64 tensors on ``device`` in one copy, each in its own shape: packed into one host tensor,
    pinned on CUDA and copied without blocking the host (a copy from pageable memory would wait)."""
    packed = torch.cat([v.reshape(-1) for v in values])
    if device.type == "cuda":
        packed = packed.pin_memory()
    moved = packed.to(device, non_blocking=True).split([v.numel() for v in values])
    return [m.view(v.shape) for m, v in zip(moved, values)]


def _host_index_tensor(op: str, name: str, value: object, dim: int, device: torch.device) -> torch.Tensor:
    """A plan argument given on the host (Python ints, or a CPU tensor next to a cache elsewhere) as an int64
    CPU tensor of ``dim`` dimensions; a tensor on a third device, or of the wrong kind, is a ValueError."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {value.device} but the cache is on {device}; pass it on the "
                             f"cache's device, on the CPU or as Python ints")
        if value.dtype != torch.long or value.dim() != dim:
            raise ValueError(f"{op}: {name} must be a {dim}-D torch.int64 tensor, got shape {tuple(value.shape)} "
                             f"and dtype {value.dtype}")
        return value.contiguous()
    if dim == 1:
        return torch.tensor(_int_list(op, name, value), dtype=torch.long)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{op}: {name} must be a sequence of sequences of ints, got {type(value).__name__}")
    rows = [_int_list(op, f"{name}[{i}]", r) for i, r in enumerate(value)]
    if any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"{op}: {name}'s rows must all have the same length W (pad them; counts says how many "
                         f"entries of each row are read), got lengths {[len(r) for r in rows]}")
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(rows[0]) if rows else 0)


def cpn_verify(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    positive_ids: Sequence[int],
    negative_ids: Sequence[int],
    alpha: float,
    *,
    lm_head_bias: Optional[torch.Tensor] = None,
    logit_softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score drafted steps with CPN from the target's hidden states at the verdict positions.

    Computes ``cpn = s+ / (s+ + s-) = sigmoid(logsumexp(l[P]) - logsumexp(l[N]))`` where ``l`` are the
    verdict position's logits, using only the ``|P| + |N|`` rows of the LM head: no ``[B, V]`` tensor is
    ever formed.

    Parameters
    ----------
    hidden : Tensor, shape ``[B, H]``
        Final hidden states (after the model's last norm) at each verdict position; float32, float64,
        bfloat16 or float16, contiguous.
    lm_head_weight : Tensor, shape ``[V, H]``
        The target's output embedding, same dtype and device as ``hidden``, contiguous.
    positive_ids, negative_ids : sequence of int, or 1-D integer CPU tensor
        Token ids of positive ("Yes", " Yes", ...) and negative verdicts: non-empty, in ``[0, V)``, without
        repeats, disjoint; at most 64 each. They travel to the kernel as arguments, so a device tensor is
        refused (reading it would synchronise).
    alpha : float
        Acceptance threshold in ``[0, 1]``: accept iff ``cpn > alpha``. alpha = 0 accepts every step with a
        finite verdict, alpha = 1 rejects every step.
    lm_head_bias : Tensor, shape ``[V]``, optional
        Output bias, same dtype as ``hidden``.
    logit_softcap : float
        If > 0, logits become ``softcap * tanh(l / softcap)`` (Gemma 2 style soft-capping).

    Returns
    -------
    cpn : Tensor, shape ``[B]``, float32
        NaN where any verdict logit is not finite (NaN or infinite hidden states).
    accept : Tensor, shape ``[B]``, bool
        ``cpn > alpha``; always False where cpn is NaN: a broken verdict never accepts a step.
    """
    op = "cpn_verify"
    _check_tensors(op, [("hidden", hidden), ("lm_head_weight", lm_head_weight), ("lm_head_bias", lm_head_bias)])
    return torch.ops.dreamr.cpn_verify(
        hidden,
        lm_head_weight,
        lm_head_bias,
        _int_list(op, "positive_ids", positive_ids),
        _int_list(op, "negative_ids", negative_ids),
        _real(op, "alpha", alpha),
        _real(op, "logit_softcap", logit_softcap),
    )


def cpn_window_accept(
    cpn: torch.Tensor, valid: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold a window of cpn scores and count each request's leading accepted steps, in one launch.

    Parameters
    ----------
    cpn : Tensor, shape ``[R, W]``, float32
        CPN of the step drafted in lookahead slot ``w`` of request ``r``.
    valid : Tensor, shape ``[R, W]``, bool
        Which slots hold a verified step; an invalid slot ends the accepted run like a rejection.
    alpha : float
        Threshold in ``[0, 1]``, with the same exact ends as :func:`cpn_verify`.

    Returns
    -------
    num_accepted : Tensor, shape ``[R]``, int64
        Index of the first rejected (or invalid) slot, W if every slot was accepted.
    accept : Tensor, shape ``[R, W]``, bool
        Per-slot ``valid & cpn > alpha``.
    """
    op = "cpn_window_accept"
    _check_tensors(op, [("cpn", cpn), ("valid", valid)])
    return torch.ops.dreamr.cpn_window_accept(cpn, valid, _real(op, "alpha", alpha))


def kv_rollback(
    cache: Sequence[torch.Tensor],
    lengths: _IntsOrTensor,
    *,
    copy_src_row: Optional[_IntsOrTensor] = None,
    copy_src_start: Optional[_IntsOrTensor] = None,
    copy_length: Optional[_IntsOrTensor] = None,
) -> torch.Tensor:
    """Roll every layer's KV cache back to each row's committed length, in place, in one call.

    Row ``b`` of every tensor keeps positions ``[0, lengths[b])``. Where ``copy_src_row[b] >= 0`` it then
    receives the span ``[copy_src_start[b], copy_src_start[b] + copy_length[b])`` of row
    ``copy_src_row[b]`` at position ``lengths[b]`` (the FPSR clean fallback: a target branch's step
    becomes the main sequence's next step). Positions from a row's new length up to ``new_lengths.max()``
    are zeroed, so a shorter row's dead span holds no leftover step (its contents are deterministic; an
    attention mask must still hide it); positions past ``new_lengths.max()`` are left as they are: the
    caller crops the time axis there (for instance ``DynamicCache.crop``).

    A source span must lie inside what its row keeps (``copy_src_start + copy_length <=
    lengths[src]``) and a source row must not itself receive a copy, so the result never depends on
    the order of writes.

    Parameters
    ----------
    cache : sequence of Tensor, each shape ``[B, H_kv, T, D]``
        Keys and values of all layers, in transformers' cache layout; same shape, strides, dtype and
        device. Rows, heads and positions may be strided (views of a cropped cache are fine), the head
        dimension must be dense (stride 1) and no two elements may share memory (an expanded view, stride
        0, is refused: it is written in place). At most 256 tensors (128 layers) per call.
    lengths : Tensor ``[B]`` int64 on the cache's device, or sequence of int
        Committed length of each row, in ``[0, T]``.
    copy_src_row, copy_src_start, copy_length : Tensor ``[B]`` int64 on the cache's device, or sequence of int, optional
        Given together or not at all; ``copy_src_row[b] = -1`` copies nothing into row b.

    Returns
    -------
    new_lengths : Tensor, shape ``[B]``, int64
        ``lengths + copy_length`` where a copy was made, else ``lengths``.

    Notes
    -----
    On the CPU every value is checked. On CUDA the values live on the device and are not read back (no
    host synchronisation): pass Python ints for all of them to have them checked on the host first, as
    :class:`dreamr.cache` does (they are then moved to the device in one non-blocking copy). Where at
    least one of them is a CUDA tensor nothing is read back and nothing is checked; instead the kernel
    clamps lengths and spans into ``[0, T]``, clips a source span to what its row keeps, and treats an
    invalid copy plan (a row copying from itself, or from a row that also receives a copy) as no copy for
    that row, so the result is still race-free and in bounds. The CPU raises ``ValueError`` for all of
    these instead.
    """
    copies = (copy_src_row, copy_src_start, copy_length)
    if any(c is not None for c in copies) and not all(c is not None for c in copies):
        raise ValueError(
            "kv_rollback: copy_src_row, copy_src_start and copy_length must be given together, got "
            + ", ".join(f"{n}={'None' if c is None else 'given'}" for n, c in
                        zip(("copy_src_row", "copy_src_start", "copy_length"), copies))
        )
    op = "kv_rollback"
    cache = _cache_list(op, cache)
    named = [("lengths", lengths), ("copy_src_row", copy_src_row), ("copy_src_start", copy_src_start),
             ("copy_length", copy_length)]
    device = _check_tensors(op, [(f"cache[{i}]", t) for i, t in enumerate(cache)]
                            + [(n, v) for n, v in named if isinstance(v, torch.Tensor)])
    # Python sequences become int lists here (floats and bools refused); tensors go to the op as they are.
    host = {n: _int_list(op, n, v) for n, v in named if v is not None and not isinstance(v, torch.Tensor)}
    if not host:
        return torch.ops.dreamr.kv_rollback_(cache, lengths, copy_src_row, copy_src_start, copy_length)
    has_copies = copy_src_row is not None
    all_host = len(host) == sum(v is not None for _, v in named)
    if device.type != "cpu" and all_host and cache[0].dim() == 4:  # (a wrong shape is reported by the op)
        # Only host values: check them on the host (the same C++ checks the CPU kernel runs on its tensors).
        torch.ops.dreamr.kv_rollback_check(
            host["lengths"], *(host[n] if has_copies else [] for n, _ in named[1:]), int(cache[0].shape[2])
        )
    # All host values moved to the device in one copy (from pinned memory on CUDA).
    moved = dict(zip(host, _to_device([torch.tensor(v, dtype=torch.long) for v in host.values()], device)))
    args = [moved.get(n, v) for n, v in named]
    return torch.ops.dreamr.kv_rollback_(cache, *args)


def kv_compact(
    cache: Sequence[torch.Tensor],
    src_rows: _IntsOrTensor,
    columns: Union[Sequence[Sequence[int]], torch.Tensor],
    counts: _IntsOrTensor,
) -> None:
    """Compact every layer's KV cache in place, in one call: the kept entries of the kept rows moved to the front.

    Output row ``i`` of every tensor becomes, at positions ``[0, counts[i])``, the positions
    ``columns[i, :counts[i]]`` of input row ``src_rows[i]``; its positions ``[counts[i], max(counts))`` are
    zeroed, so a shorter row's dead span holds no stale entry (its contents are deterministic; an attention
    mask must still hide it). Positions past ``max(counts)`` and rows ``[B', B)`` are left as they are:
    the caller crops them or no longer reads them. ``columns[i, j]`` with ``j >= counts[i]`` is padding,
    never read. This is what FPSR's ragged batches do when they drop released rows and close the column
    gaps of private verdict tokens (``docs/architecture.md``, mode "fpsr", hop 10).

    The cache is rewritten in place, front to back, so a plan may only move entries towards the front:
    ``src_rows`` strictly increasing, and each row's first ``counts[i]`` columns strictly increasing
    (together these give ``src_rows[i] >= i`` and ``columns[i, j] >= j``). Then every entry is read before
    anything overwrites it and the result equals a gather from a copy of the cache taken before the call
    (:func:`dreamr.reference.kv_compact`; ``csrc/include/dreamr/rollback.h`` gives the argument).

    Parameters
    ----------
    cache : sequence of Tensor, each shape ``[B, H_kv, T, D]``
        Keys and values of all layers, with the layout rules of :func:`kv_rollback`: one shape, strides,
        dtype and device; rows, heads and positions may be strided, the head dimension dense, no element
        shared; at most 256 tensors per call.
    src_rows : Tensor ``[B']`` int64, or sequence of int
        The input row each output row ``i < B'`` is taken from, ``B' <= B``; in ``[0, B)``, strictly
        increasing.
    columns : Tensor ``[B', W]`` int64, or sequence of ``B'`` sequences of ``W`` ints
        Row ``i``'s first ``counts[i]`` entries name, in order, the positions of ``src_rows[i]`` that become
        its positions ``0, 1, ...``: in ``[0, T)``, strictly increasing; ``W <= T``.
    counts : Tensor ``[B']`` int64, or sequence of int
        Entries kept per output row, in ``[0, W]``.

    Returns
    -------
    None
        The cache tensors are written in place.

    Notes
    -----
    Plan arguments given as Python ints or as CPU tensors are host values: on the CPU the kernel checks
    them; next to a cache on another device they are checked on the host first (the same C++ checks, via
    ``kv_compact_check``) and moved to the device in one non-blocking copy from pinned memory. A plan
    tensor on the cache's CUDA device is used as it is, not read back and not checked (no host
    synchronisation); where any of the three is one, nothing is checked: the kernel clamps every index into
    range, and since it runs the front-to-back pass with every read of a chunk of positions before its
    writes, a plan that breaks the order rules still gets a deterministic, race-free result (that of the
    in-place pass, no longer a gather's). The CPU raises ``ValueError`` for all of these instead.
    """
    op = "kv_compact"
    cache = _cache_list(op, cache)
    device = _check_tensors(op, [(f"cache[{i}]", t) for i, t in enumerate(cache)])
    plan, host = [], []
    for name, value, dim in (("src_rows", src_rows, 1), ("columns", columns, 2), ("counts", counts, 1)):
        if isinstance(value, torch.Tensor) and value.device == device:
            plan.append(value)  # on the cache's device; the op checks it (values too, on the CPU)
        else:
            plan.append(_host_index_tensor(op, name, value, dim, device))
            host.append(len(plan) - 1)
    if host and device.type != "cpu":
        if len(host) == len(plan) and cache[0].dim() == 4:  # (a wrong cache shape is reported by the op)
            torch.ops.dreamr.kv_compact_check(*plan, int(cache[0].shape[0]), int(cache[0].shape[2]))
        for i, moved in zip(host, _to_device([plan[i] for i in host], device)):
            plan[i] = moved
    torch.ops.dreamr.kv_compact_(cache, *plan)


def speculative_sample(
    draft_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    uniforms: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain speculative sampling (Leviathan et al. 2023): keeps the target's distribution exactly.

    Draft token ``x_k ~ q_k`` is accepted with probability ``min(1, p_k(x)/q_k(x))``; at the first
    rejection one token is drawn from ``norm(max(0, p_k - q_k))``; if all K are accepted a bonus token is
    drawn from ``p_K``.

    Parameters
    ----------
    draft_probs : Tensor, shape ``[B, K, V]``
        Draft distributions ``q`` at each drafted position; float32, float16 or bfloat16.
    draft_ids : Tensor, shape ``[B, K]``, int64
        The drafted tokens, in ``[0, V)``. Checked on the CPU (ValueError); on CUDA they are not read
        back (no host synchronisation) and an out-of-range id counts as a rejection: the chain stops
        there and the extra token is drawn from that position's residual as at any rejection.
    target_probs : Tensor, shape ``[B, K + 1, V]``
        Target distributions ``p`` at each drafted position and one past the last; same dtype as
        ``draft_probs``.
    generator : torch.Generator, optional
        Source of randomness, on the inputs' device.
    seed : int, optional
        Seeds a fresh generator on the inputs' device: the same seed gives the same tokens on every run
        for a given device (CPU and CUDA generators produce different streams).
    uniforms : Tensor, shape ``[B, K + 1]``, float32, optional
        Explicit uniforms in ``[0, 1)`` instead of a generator: ``[:, :K]`` for the acceptance tests,
        ``[:, K]`` for the inverse-CDF draw of the extra token. Checked to lie in ``[0, 1)`` on the CPU
        only; on CUDA they are not read back.

    At most one of generator, seed and uniforms may be given.

    Returns
    -------
    tokens : Tensor, shape ``[B, K + 1]``, int64
        The accepted draft tokens followed by the resampled or bonus token, padded with -1.
    num_accepted : Tensor, shape ``[B]``, int64
        Accepted draft tokens per row, in ``[0, K]``; each row emits ``num_accepted + 1`` tokens.
    """
    op = "speculative_sample"
    given = sum(x is not None for x in (generator, seed, uniforms))
    if given > 1:
        raise ValueError("speculative_sample: give at most one of generator, seed and uniforms")
    device = _check_tensors(op, [("draft_probs", draft_probs), ("draft_ids", draft_ids),
                                 ("target_probs", target_probs), ("uniforms", uniforms)])
    if uniforms is None:
        if draft_ids.dim() != 2:
            raise ValueError(f"speculative_sample: draft_ids must be [B, K], got shape {tuple(draft_ids.shape)}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
            gen_device = torch.device(generator.device)
            if gen_device.type != device.type or (
                gen_device.index is not None and device.index is not None and gen_device.index != device.index
            ):
                raise ValueError(
                    f"{op}: generator is on {gen_device} but the inputs are on {device}; create it with "
                    f"torch.Generator(device={str(device)!r})"
                )
        if seed is not None:
            generator = torch.Generator(device=draft_ids.device).manual_seed(_index(op, "seed", seed))
        batch, k = draft_ids.shape
        uniforms = torch.rand(batch, k + 1, generator=generator, device=draft_ids.device, dtype=torch.float32)
    return torch.ops.dreamr.speculative_sample(draft_probs, draft_ids, target_probs, uniforms)


def greedy_verify(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy token-level verification: accept draft tokens while they equal the target's argmax.

    Parameters
    ----------
    draft_ids : Tensor, shape ``[B, K]``, int64
        The drafted tokens, in ``[0, V)``. Checked on the CPU (ValueError); on CUDA they are not read
        back (no host synchronisation) and an out-of-range id simply never equals the argmax: it counts
        as a rejection at that position.
    target_logits : Tensor, shape ``[B, K + 1, V]``
        Target logits (or probabilities) at each drafted position and one past; any float dtype, on
        ``draft_ids``'s device.

    Returns
    -------
    tokens : Tensor, shape ``[B, K + 1]``, int64
        Accepted draft tokens, then the target's argmax at the first mismatch (or the bonus position),
        padded with -1.
    num_accepted : Tensor, shape ``[B]``, int64
    """
    _check_tensors("greedy_verify", [("draft_ids", draft_ids), ("target_logits", target_logits)])
    return torch.ops.dreamr.greedy_verify(draft_ids, target_logits)


# Fake implementations: output shapes and dtypes only, so the ops trace under torch.compile.
@torch.library.register_fake("dreamr::cpn_verify")
def _cpn_verify_fake(hidden, lm_head_weight, lm_head_bias, positive_ids, negative_ids, alpha, logit_softcap=0.0):
    batch = hidden.shape[0]
    return (
        hidden.new_empty((batch,), dtype=torch.float32),
        hidden.new_empty((batch,), dtype=torch.bool),
    )


@torch.library.register_fake("dreamr::cpn_window_accept")
def _cpn_window_accept_fake(cpn, valid, alpha):
    return cpn.new_empty((cpn.shape[0],), dtype=torch.long), cpn.new_empty(cpn.shape, dtype=torch.bool)


@torch.library.register_fake("dreamr::kv_rollback_")
def _kv_rollback_fake(cache, lengths, copy_src_row, copy_src_start, copy_length):
    return lengths.new_empty(lengths.shape, dtype=torch.long)


@torch.library.register_fake("dreamr::kv_compact_")
def _kv_compact_fake(cache, src_rows, columns, counts):
    return None


@torch.library.register_fake("dreamr::speculative_sample")
def _speculative_sample_fake(draft_probs, draft_ids, target_probs, uniforms):
    batch, k = draft_ids.shape
    return draft_ids.new_empty((batch, k + 1), dtype=torch.long), draft_ids.new_empty((batch,), dtype=torch.long)


@torch.library.register_fake("dreamr::greedy_verify")
def _greedy_verify_fake(draft_ids, target_logits):
    batch, k = draft_ids.shape
    return draft_ids.new_empty((batch, k + 1), dtype=torch.long), draft_ids.new_empty((batch,), dtype=torch.long)
