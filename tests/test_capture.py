"""iseg.capture: cached plans and processors, per-call attention stores, the UNet's lock.

The captured values themselves are recomputed independently in test_pipeline.py (hooks on the
layers' projections); these tests check what a call shares with other calls: nothing but the
cached plan and processor objects.
"""

from __future__ import annotations

import threading

import pytest
import torch

from iseg import Point
from iseg.capture import AttentionStore, capture_processors, installed, make_plan

from .conftest import generator, make_image

SELF_LAYER = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"


def _text_call(pipe, seed):
    return pipe(make_image(seed), ["cat", "potted plant"], generator=generator(seed)).heatmaps


def _regions_call(pipe, seed):
    image = make_image(seed, (64, 80))
    return pipe.segment_regions(image, [Point(20 + seed, 30)], generator=generator(seed)).heatmaps


def test_two_threads_sharing_a_pipeline_get_the_results_of_calls_alone(pipe):
    """Thread 0 segments text, thread 1 regions (another plan on the same self-attention
    layer), each on its own images, at the same time: every result equals that call alone."""
    calls = [(_text_call, seed) for seed in range(4)], [(_regions_call, seed) for seed in range(10, 14)]
    alone = [[call(pipe, seed) for call, seed in thread] for thread in calls]
    together: list[list] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(index):
        try:
            start.wait()
            for _ in range(2):  # several rounds, so the calls overlap in different phases
                together[index] += [call(pipe, seed) for call, seed in calls[index]]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for index in range(2):
        assert len(together[index]) == 2 * len(alone[index])
        for got, expected in zip(together[index], alone[index] * 2):
            assert torch.equal(got, expected)


def test_processors_are_cached_but_each_call_binds_its_own_store(pipe):
    plan = make_plan(pipe.unet, SELF_LAYER, cross_weights=None)
    processors = capture_processors(pipe.unet, plan)
    assert capture_processors(pipe.unet, plan) is processors  # built once per UNet and plan
    (module, processor), = processors.items()
    first, second = AttentionStore(), AttentionStore()
    with installed(pipe.unet, processors, first):
        assert module.processor is processor and processor.store is first
    assert processor.store is None and module.processor is not processor
    with installed(pipe.unet, processors, second):
        assert processor.store is second


def test_installed_restores_and_unbinds_after_an_error(pipe):
    plan = make_plan(pipe.unet, SELF_LAYER, cross_weights=None)
    processors = capture_processors(pipe.unet, plan)
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with installed(pipe.unet, processors, AttentionStore()):
            raise RuntimeError("boom")
    assert pipe.unet.attn_processors == before
    assert all(p.store is None for p in processors.values())


def test_installed_makes_another_thread_wait(pipe):
    """While one call holds the UNet, another thread's install waits for it to finish."""
    plan = make_plan(pipe.unet, SELF_LAYER, cross_weights=None)
    processors = capture_processors(pipe.unet, plan)
    inside, order = threading.Event(), []

    def other():
        inside.wait()
        with installed(pipe.unet, processors, AttentionStore()):
            order.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    with installed(pipe.unet, processors, AttentionStore()):
        inside.set()
        thread.join(timeout=0.2)  # it cannot get in while this block holds the lock
        order.append("first")
    thread.join()
    assert order == ["first", "other"]


def test_store_clear_drops_what_a_call_captured():
    store = AttentionStore()
    store.self_attention, store.cross_sums = torch.ones(1, 4, 4), {2: torch.ones(1, 1, 3)}
    store.clear()
    assert store.self_attention is None and store.cross_sums == {}
