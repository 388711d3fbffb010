"""CUDA graphs for the FPSR executor's decode forwards (one token for every row of a ragged batch).

The decode forwards of both models (the target's fallback branches, the draft's running steps) have the
same shape turn after turn: ``[B, 1]`` tokens, ``[B, 1]`` positions and a ``[B, 1, 1, columns]`` mask over
the batch's storage. Replaying them from CUDA graphs removes the per-layer launch overhead that dominates
small-batch decoding. Shapes are bucketed: B up to the next of ``batch_sizes`` (padding rows use storage
rows past the batch's own, see only themselves, and are thrown away) and the mask width up to the next
power of two (columns past the batch's width are masked). One graph per (rows, columns) bucket, all in
one memory pool; a batch larger than the largest bucket, or more buckets than ``max_graphs``, runs eagerly.
Passes that feed several tokens to a row never come here (:meth:`RaggedBatch.forward` runs them
eagerly): verification chunks, catch-ups, and token-level speculation's passes, where a row feeds its
pending token plus a proposal and needs logits at every fed position (FPSR's branches and draft steps);
a turn whose rows propose nothing is a one-token pass again and replays its graph.

Nothing here reads the device on the host; each step copies its inputs (ids, positions, masks: a few
KB) into the bucket's static tensors on the batch's stream, staged through pinned host memory on CUDA
(a copy from pageable memory would wait for the stream). The storage is
written in place (:class:`dreamr.engines.ragged.RaggedKVLayer`), so a captured forward stays valid until
the batch's storage is reallocated to grow (``storage_version``), which drops the graphs (they are
captured again on next use). A capture that fails (a model whose forward cannot be captured) is reported
once as a warning and this instance runs eagerly from then on. On a CPU (``capture=False``) the same
bucketed static-buffer forward runs eagerly: that is how the tests check this path's results without a GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dreamr.engines.ragged import MIN_COLUMNS, copy_from_host

__all__ = ["DEFAULT_BATCH_SIZES", "DecodeGraphs", "check_batch_sizes"]

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    """``batch_sizes`` as a tuple of increasing positive ints, or a ValueError that says what is wrong."""
    try:
        sizes = tuple(batch_sizes)
    except TypeError:
        sizes = ()
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes) \
            or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"graph_batch_sizes must be increasing positive ints, e.g. (1, 2, 4, 8), got {batch_sizes!r}")
    return sizes


@dataclass
class _Bucket:
    """The static inputs and output of one (rows, columns) bucket."""

    rows: int
    columns: int
    input_ids: torch.Tensor  # [rows, 1]
    position_ids: torch.Tensor  # [rows, 1]
    write_col: torch.Tensor  # [1]: the storage column the new token's keys/values go to
    masks: dict  # kind -> [rows, 1, 1, columns] (bool, or additive in the model's dtype)
    forward: Optional[Callable[[], torch.Tensor]] = None  # runs the model on the static inputs
    graph: Optional["torch.cuda.CUDAGraph"] = None
    hidden: Optional[torch.Tensor] = None  # [rows, 1, H]: the captured output


class DecodeGraphs:
    """Bucketed CUDA graphs of a :class:`~dreamr.engines.ragged.RaggedBatch`'s one-token-per-row forward.

    Parameters
    ----------
    batch : RaggedBatch
        The batch whose decode forwards are replayed (its model, storage and stream).
    batch_sizes : tuple of int
        Row buckets, increasing; a batch of B rows runs in the first bucket >= B.
    capture : bool, optional
        Capture CUDA graphs (default: when the batch's device is CUDA). False runs the same bucketed
        forward eagerly.
    max_graphs : int
        At most this many buckets are kept; other shapes run eagerly.
    """

    def __init__(self, batch, batch_sizes=DEFAULT_BATCH_SIZES, capture: Optional[bool] = None, max_graphs: int = 32):
        sizes = check_batch_sizes(batch_sizes)
        if capture is None:
            capture = batch.device.type == "cuda"
        if capture and batch.device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA device; the {batch.name} batch is on {batch.device}")
        self.batch, self.batch_sizes, self.capture, self.max_graphs = batch, sizes, bool(capture), int(max_graphs)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._version = batch.storage_version
        self._pool = None
        # bucketed_forwards: decode forwards through the static buffers (replayed, or run eagerly on a CPU);
        # eager_fallbacks: decode forwards no bucket held (run by the batch's ordinary eager path)
        self.stats: dict = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters (the FPSR engine reports them per run)."""
        self.stats = {"bucketed_forwards": 0, "graph_replays": 0, "graph_captures": 0, "eager_fallbacks": 0}

    def bucket(self, rows: int, width: int) -> Optional[tuple[int, int]]:
        """The (rows, columns) bucket of a decode forward of ``rows`` rows over ``width`` cached columns,
        or None when no bucket holds it."""
        padded = next((b for b in self.batch_sizes if b >= rows), None)
        if padded is None:
            return None
        return padded, max(MIN_COLUMNS, 1 << width.bit_length())  # > width: room for the new column

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            rotary_positions: torch.Tensor) -> Optional[torch.Tensor]:
        """The final hidden states ``[B, 1, H]`` of one decode forward, or None (the caller runs it eagerly).

        ``input_ids``, ``positions`` and ``rotary_positions`` are ``[B, 1]`` on the host: every row of the
        batch is fed one token at the given logical position (masks) and rotary position (the model).
        """
        batch = self.batch
        B, T = input_ids.shape[0], batch.width
        key = self.bucket(B, T)
        if key is None or (key not in self._buckets and len(self._buckets) >= self.max_graphs):
            self.stats["eager_fallbacks"] += 1
            return None
        rows, columns = key
        batch.reserve(rows, columns)
        if batch.storage_version != self._version:  # the storage moved: captured addresses are stale
            self._buckets.clear()
            self._pool = None
            self._version = batch.storage_version
        b = self._buckets.get(key)
        fresh = b is None
        if fresh:
            b = self._new_bucket(rows, columns)
        self._fill(b, input_ids, positions, rotary_positions, T)
        if not self.capture:
            self._buckets[key] = b
            self.stats["bucketed_forwards"] += 1
            return b.forward()[:B]
        if fresh:
            try:
                self._capture(b)
            except Exception as exc:  # noqa: BLE001 - any capture failure: run this model eagerly
                warnings.warn(f"dreamr: CUDA graph capture of the {batch.name} decode forward failed ({exc!r}); "
                              "it runs eagerly from now on", RuntimeWarning, stacklevel=2)
                self.capture, self._buckets, self._pool = False, {}, None
                self.stats["eager_fallbacks"] += 1
                return None
            self._buckets[key] = b
        b.graph.replay()
        self.stats["bucketed_forwards"] += 1
        self.stats["graph_replays"] += 1
        # a copy: the graph's output is overwritten by the next replay of any bucket (one memory pool)
        return b.hidden[:B].clone()

    # -- internals -----------------------------------------------------------------------------------

    def _new_bucket(self, rows: int, columns: int) -> _Bucket:
        batch = self.batch
        dev = batch.device
        mask_dtype = batch.dtype if batch.additive_mask else torch.bool
        with torch.inference_mode(False):  # static inputs outlive the call, written in place (as the storage)
            b = _Bucket(rows, columns,
                        input_ids=torch.zeros(rows, 1, dtype=torch.long, device=dev),
                        position_ids=torch.zeros(rows, 1, dtype=torch.long, device=dev),
                        write_col=torch.zeros(1, dtype=torch.long, device=dev),
                        masks={kind: torch.zeros(rows, 1, 1, columns, dtype=mask_dtype, device=dev)
                               for kind in batch.mask_kinds()})
        cache = batch.cache_view(rows, columns - 1, columns, b.write_col)
        attention_mask = batch.model_masks(b.masks)
        kw = {batch._cache_kw: cache}

        def forward() -> torch.Tensor:
            out = batch.base(input_ids=b.input_ids, attention_mask=attention_mask, position_ids=b.position_ids,
                             use_cache=True, **kw)
            return out.last_hidden_state

        b.forward = forward
        return b

    def _fill(self, b: _Bucket, input_ids: torch.Tensor, positions: torch.Tensor, rotary_positions: torch.Tensor,
              width: int) -> None:
        """Copy one forward's inputs into the bucket's static tensors (padding rows: token 0 at
        position 0, seeing only their own new column)."""
        batch = self.batch
        B = input_ids.shape[0]
        ids = torch.zeros(b.rows, 1, dtype=torch.long)
        pos = torch.zeros(b.rows, 1, dtype=torch.long)
        ids[:B], pos[:B] = input_ids, rotary_positions
        copy_from_host(b.input_ids, ids)
        copy_from_host(b.position_ids, pos)
        b.write_col.fill_(width)
        q_valid = torch.ones(B, 1, dtype=torch.bool)
        q_tag = torch.zeros(B, 1, dtype=torch.long)
        for kind, static in b.masks.items():
            m = torch.zeros(b.rows, 1, 1, b.columns, dtype=torch.bool)
            m[:B, :, :, :width + 1] = batch.mask(positions, q_tag, q_valid, kind != "full")
            m[B:, 0, 0, width] = True
            if batch.additive_mask:
                static.copy_(batch.to_model_mask(m))
            else:
                copy_from_host(static, m)

    def _capture(self, b: _Bucket) -> None:
        """Warm up on a side stream (lazy initialisations stay out of the graph), then capture."""
        current = torch.cuda.current_stream(self.batch.device)
        side = torch.cuda.Stream(self.batch.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                b.forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            b.hidden = b.forward()
        self._pool = graph.pool()
        b.graph = graph
        self.stats["graph_captures"] += 1
