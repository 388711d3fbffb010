"""Microbenchmarks of dreamr's compiled ops against their PyTorch baselines, then end-to-end latency.

    python bench/latency.py                 # all ops, realistic shapes, on CUDA if present else CPU,
                                            # then the end-to-end per-step breakdown (real models)
    python bench/latency.py --json out.json # also write the records (ops and end-to-end rows)
    python bench/latency.py --quick         # small shapes, a smoke run (end-to-end: one problem)
    python bench/latency.py --no-e2e        # the op microbenchmarks only
    python bench/latency.py --threads 4     # torch CPU threads (default: all cores; recorded)

Each row times an op and its baseline side by side in the same process (interleaved repetitions, median
of each), so machine noise hits both alike. Baselines: the plain PyTorch references in
dreamr/reference.py; for CPN also the naive way (full LM head over the vocabulary, softmax, gather), for
rollback the per-layer loop a transformers user would write, and for compaction the per-layer
``index_select`` + ``gather`` that FPSR's ragged batches ran before ``kv_compact``. A WARNING row follows each op whose
speedup is below its aim (:data:`AIMS`).

The end-to-end section (bench/e2e_latency.py) runs by default: per-step latency of each mode (target,
draft, speculative, fpsr) broken into phases. In --json its rows are records with ``op`` =
``"e2e/<mode>[@alpha]"`` (the op rows keep their keys: op, baseline, device, shape, median_ms,
baseline_median_ms, speedup, threads, aim, meets_aim).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from dreamr import ops, reference

_BENCH = Path(__file__).resolve().parent

# The aims from the issue: (op name prefix, baseline, batch size B or None for any, minimum speedup).
AIMS = (
    ("cpn_verify", "naive full-vocab softmax", 64, 100.0),
    ("cpn_verify", "reference", 64, 2.0),
    ("kv_rollback", "per-layer PyTorch loop", None, 3.0),
    ("speculative_sample", "reference", 32, 2.0),
)


@dataclass
class Record:
    op: str
    baseline: str
    device: str
    shape: str
    median_ms: float
    baseline_median_ms: float
    speedup: float  # baseline_median_ms / median_ms
    threads: int = 0  # torch.get_num_threads() during the run
    aim: Optional[float] = None  # the speedup the issue aims for at this shape (None: no aim here)
    meets_aim: Optional[bool] = None


def aim_of(record: Record) -> Optional[float]:
    """The issue's speedup aim for this op, baseline and batch size (None where it sets none)."""
    m = re.search(r"\bB=(\d+)", record.shape)
    batch = int(m.group(1)) if m else None
    for op, baseline, b, aim in AIMS:
        if record.op.startswith(op) and record.baseline == baseline and (b is None or b == batch):
            return aim
    return None


def _end_to_end(argv: list) -> list:
    """bench/e2e_latency.py's ``main(argv)``: loaded from its file beside this one (bench/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("e2e_latency", _BENCH / "e2e_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def compare(op: Callable, baseline: Callable, device: torch.device, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median milliseconds of op and baseline, their repetitions interleaved."""
    for _ in range(warmup):
        op(), baseline()
    op_times, base_times = [], []
    for _ in range(repeats):
        op_times.append(timed(op, device))
        base_times.append(timed(baseline, device))
    return statistics.median(op_times), statistics.median(base_times)


def bench_cpn(device, dtype, hidden, vocab, batches, repeats, naive_repeats):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
    ids = torch.randperm(vocab, generator=g)[:12].tolist()  # six positive and six negative verdict tokens
    pos, neg = ids[:6], ids[6:]
    for batch in batches:
        h = torch.randn(batch, hidden, generator=g).to(device=device, dtype=dtype)
        shape = f"B={batch} H={hidden} V={vocab} |P|=|N|=6 {str(dtype).replace('torch.', '')}"
        fast = lambda: ops.cpn_verify(h, weight, pos, neg, 0.7)  # noqa: E731
        ref = lambda: reference.cpn_verify(h, weight, None, pos, neg, 0.7)  # noqa: E731
        naive = lambda: reference.cpn_verify_naive(h, weight, None, pos, neg, 0.7)  # noqa: E731
        for name, base, reps in (("reference", ref, repeats), ("naive full-vocab softmax", naive, naive_repeats)):
            a, b = compare(fast, base, device, reps, warmup=1)
            yield Record("cpn_verify", name, device.type, shape, a, b, b / a)


def bench_window(device, repeats):
    cpn = torch.rand(64, 4, device=device)
    valid = torch.ones(64, 4, dtype=torch.bool, device=device)
    a, b = compare(lambda: ops.cpn_window_accept(cpn, valid, 0.7),
                   lambda: reference.cpn_window_accept(cpn, valid, 0.7), device, repeats)
    yield Record("cpn_window_accept", "reference", device.type, "R=64 W=4", a, b, b / a)


def bench_rollback(device, dtype, layers, batch, heads, time_len, head_dim, repeats):
    """A rejected step rolled back in every row: each row drops its last 16-64 positions."""
    cache = [torch.randn(batch, heads, time_len, head_dim).to(device=device, dtype=dtype) for _ in range(2 * layers)]
    g = torch.Generator().manual_seed(1)
    lengths = time_len - torch.randint(16, 65, (batch,), generator=g)
    lengths_dev = lengths.to(device)
    lengths_host = lengths.tolist()
    longest = max(lengths_host)

    def per_layer_loop():
        # The same work without the op: each layer, each row, zero the rolled-back tail up to the longest
        # kept row (the rest is cropped away afterwards, by both).
        for t in cache:
            for b, n in enumerate(lengths_host):
                t[b, :, n:longest] = 0

    shape = f"layers={layers} B={batch} H_kv={heads} T={time_len} D={head_dim} {str(dtype).replace('torch.', '')}"
    a, b = compare(lambda: ops.kv_rollback(cache, lengths_dev), per_layer_loop, device, repeats)
    yield Record("kv_rollback", "per-layer PyTorch loop", device.type, shape, a, b, b / a)

    # FPSR fallback: rows [0, B/2) are main sequences that roll back a rejected step and take their
    # target branch's step (rows [B/2, B)) in its place.
    half = batch // 2
    step = 32
    keep = [time_len - 2 * step] * half + [time_len - step] * (batch - half)
    src_row = [half + i for i in range(half)] + [-1] * (batch - half)
    src_start = [time_len - 2 * step] * half + [0] * (batch - half)
    copy_length = [step] * half + [0] * (batch - half)
    args = [torch.tensor(x, device=device) for x in (keep, src_row, src_start, copy_length)]
    longest_after_copy = max(k + n for k, n in zip(keep, copy_length))

    def per_layer_copy_loop():
        for t in cache:
            for b in range(batch):
                k = keep[b]
                if src_row[b] >= 0:
                    n = copy_length[b]
                    t[b, :, k : k + n] = t[src_row[b], :, src_start[b] : src_start[b] + n]
                    k += n
                t[b, :, k:longest_after_copy] = 0

    a, b = compare(lambda: ops.kv_rollback(cache, args[0], copy_src_row=args[1], copy_src_start=args[2],
                                           copy_length=args[3]), per_layer_copy_loop, device, repeats)
    yield Record("kv_rollback+branch copy", "per-layer PyTorch loop", device.type, shape, a, b, b / a)


def bench_compact(device, dtype, layers, batch, heads, time_len, head_dim, repeats):
    """FPSR's ragged-batch compaction: of B rows two were released, and every live row has three private
    verdict segments of 8 columns to close (what RaggedBatch.compact asks of the op)."""
    cache = [torch.randn(batch, heads, time_len, head_dim).to(device=device, dtype=dtype) for _ in range(2 * layers)]
    g = torch.Generator().manual_seed(3)
    released = set(torch.randperm(batch, generator=g)[:2].tolist())
    rows = [b for b in range(batch) if b not in released]
    keep = torch.ones(len(rows), time_len, dtype=torch.bool)
    for i in range(len(rows)):
        for start in torch.randperm(time_len - 8, generator=g)[:3].tolist():
            keep[i, start:start + 8] = False
    counts = keep.sum(dim=1)
    width = int(counts.max())
    columns = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width].contiguous()
    src_rows = torch.tensor(rows, dtype=torch.long)
    plan = [t.to(device) for t in (src_rows, columns, counts)]

    def per_layer_gather():
        # RaggedBatch.compact before kv_compact: per layer tensor a row gather, a column gather, a copy back
        index = plan[1][:, None, :, None].expand(len(rows), heads, width, head_dim)
        for t in cache:
            t[:len(rows), :, :width].copy_(torch.gather(t.index_select(0, plan[0]), 2, index))

    shape = f"layers={layers} B={batch}->{len(rows)} H_kv={heads} T={time_len} D={head_dim} " \
            f"{str(dtype).replace('torch.', '')}"
    fast = lambda: ops.kv_compact(cache, *plan)  # noqa: E731
    for name, base in (("reference", lambda: reference.kv_compact(cache, *plan)),
                       ("per-layer index_select+gather", per_layer_gather)):
        a, b = compare(fast, base, device, repeats)
        yield Record("kv_compact", name, device.type, shape, a, b, b / a)


def bench_sampling(device, batch, k, vocab, repeats):
    g = torch.Generator().manual_seed(2)
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g), -1).to(device)
    p = torch.softmax(torch.randn(batch, k + 1, vocab, generator=g), -1).to(device)
    ids = torch.multinomial(q.reshape(-1, vocab).cpu(), 1, generator=g).reshape(batch, k).to(device)
    u = torch.rand(batch, k + 1, generator=g).to(device)
    shape = f"B={batch} K={k} V={vocab} float32"
    a, b = compare(lambda: ops.speculative_sample(q, ids, p, uniforms=u),
                   lambda: reference.speculative_sample(q, ids, p, u), device, repeats)
    yield Record("speculative_sample", "reference", device.type, shape, a, b, b / a)
    logits = torch.randn(batch, k + 1, vocab, generator=g).to(device)
    a, b = compare(lambda: ops.greedy_verify(ids, logits), lambda: reference.greedy_verify(ids, logits), device, repeats)
    yield Record("greedy_verify", "reference", device.type, shape, a, b, b / a)


def main(argv=None) -> list[Record]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="write the records (ops, then e2e rows) as a JSON list")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per op (default 20, quick 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: all cores, %(default)s here); recorded in the output")
    parser.add_argument("--no-e2e", action="store_true",
                        help="skip the end-to-end per-step latency breakdown per mode (real models; "
                             "bench/e2e_latency.py), which runs by default")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    repeats = args.repeats or (3 if args.quick else 20)
    if args.quick:
        hidden, vocab, batches, layers, time_len = 256, 4096, [1, 8], 4, 64
    else:
        hidden, vocab, batches, layers, time_len = 4096, 151936, [1, 8, 64], 32, 1024
    dtype = torch.bfloat16

    records: list[Record] = []
    groups = [
        bench_cpn(device, dtype, hidden, vocab, batches, repeats, naive_repeats=max(2, repeats // 5)),
        bench_window(device, repeats),
        bench_rollback(device, dtype, layers, 8, 8, time_len, 128 if not args.quick else 16, repeats),
        bench_compact(device, dtype, layers, 8, 8, time_len, 128 if not args.quick else 16, repeats),
        bench_sampling(device, 32 if not args.quick else 4, 5, 32000 if not args.quick else 1000, repeats),
    ]
    header = f"{'op':<24} {'baseline':<29} {'shape':<56} {'op ms':>9} {'base ms':>10} {'speedup':>8} {'aim':>6}"
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {threads}")
    print(header)
    print("-" * len(header))
    for group in groups:
        for r in group:
            r.threads = threads
            r.aim = aim_of(r)
            r.meets_aim = None if r.aim is None else r.speedup >= r.aim
            records.append(r)
            aim = "-" if r.aim is None else f"{r.aim:g}x"
            print(f"{r.op:<24} {r.baseline:<29} {r.shape:<56} {r.median_ms:>9.3f} {r.baseline_median_ms:>10.3f} "
                  f"{r.speedup:>7.1f}x {aim:>6}", flush=True)
            if r.meets_aim is False:
                print(f"WARNING {r.op} vs {r.baseline}: {r.speedup:.2f}x is below the aim of {r.aim:g}x "
                      f"({r.shape})", flush=True)

    e2e_rows: list = []
    e2e_error = None
    if not args.no_e2e:
        try:
            e2e_rows = _end_to_end(["--device", args.device] + (["--quick"] if args.quick else []))
        except SystemExit as exc:  # its own argument errors
            e2e_error = f"exit status {exc.code}"
        except Exception as exc:  # noqa: BLE001 - the op records are still written; the exit status says so
            e2e_error = f"{type(exc).__name__}: {exc}"
        if e2e_error:
            print(f"ERROR end-to-end section failed: {e2e_error} (--no-e2e skips it)", file=sys.stderr)
    if args.json:
        out = [asdict(r) for r in records]
        for row in e2e_rows:
            out.append({"op": f"e2e/{row['variant']}", "device": args.device, "threads": threads, **row})
        if e2e_error:
            out.append({"op": "e2e/error", "error": e2e_error, "threads": threads})
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if e2e_error:
        raise SystemExit(1)
    return records


if __name__ == "__main__":
    main()
