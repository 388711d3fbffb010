"""Memory does not grow over 100 sequential requests."""

from __future__ import annotations

import gc
import warnings

import torch

from conftest import PROMPTS


def live_objects():
    """(live tensors, their bytes, all gc-tracked Python objects)."""
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance() pokes deprecated torch module attributes
        warnings.simplefilter("ignore")
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta"), len(objects)


def test_no_growth_over_100_requests(reasoner, content_judge):
    content_judge(reasoner)  # mixed accept / reject: every rollback path runs
    kw = dict(alpha=0.5, max_new_tokens=12, max_step_tokens=4)
    for p in PROMPTS:  # warm-up: lazily built engines, verifiers, tokenizer caches
        reasoner.generate(p, **kw)
    caches0 = (len(reasoner._verifiers), len(reasoner._engines))
    count0, bytes0, objects0 = live_objects()
    sources = set()
    for i in range(100):
        r = reasoner.generate(PROMPTS[i % len(PROMPTS)], **kw)
        sources |= {s.source for s in r.steps}
        del r
    count1, bytes1, objects1 = live_objects()
    assert sources == {"draft", "target"}
    assert count1 == count0 and bytes1 == bytes0, (count0, count1, bytes0, bytes1)
    # a leak of one object per request would show as >= 100
    assert objects1 - objects0 < 50, f"{objects1 - objects0} more live Python objects after 100 requests"
    assert (len(reasoner._verifiers), len(reasoner._engines)) == caches0
