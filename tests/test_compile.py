"""The capture step as one graph: no exception ends the forward, no host synchronisation inside,
and ``pipe.compile()`` gives the eager outputs (issue: a graph-capturable truncated forward)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch._dynamo

import iseg_ops
from iseg import Box, ISegPipeline, Point, capture
from iseg import pipeline as pipeline_module

from .conftest import generator, make_image


@pytest.fixture
def fresh_pipe(components, monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
    torch._dynamo.reset()
    # Its own VAE: compile() moves the VAE to channels_last, the session's stays as it is.
    pipe = ISegPipeline(**{**components, "vae": copy.deepcopy(components["vae"])})
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch._dynamo.reset()


def test_no_stop_forward_exception_remains():
    assert not hasattr(capture, "StopForward")


def _compiled_equals_eager(pipe, image, backend):
    eager = pipe(image, ["cat", "dog"], generator=generator(), output_attentions=True)
    eager_regions = pipe.segment_regions(image, [Point(20, 30), Box(0, 0, 40, 40)], iters=5, generator=generator())
    torch._dynamo.utils.counters.clear()
    assert pipe.compile(backend=backend, dynamic=False) is pipe
    out = pipe(image, ["cat", "dog"], generator=generator(), output_attentions=True)
    regions = pipe.segment_regions(image, [Point(20, 30), Box(0, 0, 40, 40)], iters=5, generator=generator())
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # text and text-free plans
    torch.testing.assert_close(out.self_attention, eager.self_attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.heatmaps, eager.heatmaps, atol=1e-4, rtol=0)
    torch.testing.assert_close(regions.heatmaps, eager_regions.heatmaps, atol=1e-4, rtol=0)


def test_compile_eager_backend_matches_without_graph_breaks(fresh_pipe, image):
    _compiled_equals_eager(fresh_pipe, image, "eager")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_compile_inductor_matches(fresh_pipe, image):
    _compiled_equals_eager(fresh_pipe, image, "inductor")


def test_capture_step_has_no_host_synchronisation(fresh_pipe, image):
    """``fullgraph=True`` turns any ``.item()``/``.tolist()``/data-dependent branch in the
    truncated forward and the capture processors into an error."""
    pipe = fresh_pipe

    def forbid_sync(*args, **kwargs):
        raise AssertionError("host synchronisation inside the capture step")

    pipe.compile(backend="eager")
    # A graph that called .item() would fail to compile with fullgraph=True; check it compiled
    # and then that running the compiled step never reads a tensor on the host.
    pipe(image, ["cat"], generator=generator())
    original_item, original_tolist = torch.Tensor.item, torch.Tensor.tolist
    calls = []
    step = pipe._capture_step

    def traced(*args, **kwargs):
        torch.Tensor.item, torch.Tensor.tolist = forbid_sync, forbid_sync
        try:
            return step(*args, **kwargs)
        finally:
            torch.Tensor.item, torch.Tensor.tolist = original_item, original_tolist
            calls.append(1)

    pipe._capture_step = traced
    pipe(image, ["cat"], generator=generator())
    assert calls == [1]


def test_processors_restored_after_an_error_in_the_compiled_step(fresh_pipe, image):
    pipe = fresh_pipe.compile(backend="eager")
    before = dict(pipe.unet.attn_processors)

    def boom(*args):
        raise RuntimeError("boom")

    handle = pipe.unet.up_blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pipe(image, ["cat"], generator=generator())
    handle.remove()
    assert pipe.unet.attn_processors == before


def test_non_finite_output_is_one_clear_error_at_the_end(fresh_pipe, image):
    pipe = fresh_pipe
    handle = pipe.unet.conv_in.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(ValueError, match="self_attention contains NaN or Inf"):
        pipe(image, ["cat"], generator=generator())
    handle.remove()


def test_compile_gives_each_step_the_mode_and_runs_it_with_cudnn_benchmark(fresh_pipe, image, monkeypatch):
    """``pipe.compile(mode=...)`` hands ``mode`` to ``torch.compile`` for the VAE encoder, the
    capture step and refine, and each compiled step runs with cuDNN's autotuner on."""
    compiled, calls = [], []

    def fake_compile(fn, **kwargs):
        compiled.append((fn, kwargs))

        def run(*args, **kw):
            calls.append((fn, torch.backends.cudnn.benchmark))
            return fn(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    pipe = fresh_pipe.compile(mode="reduce-overhead", dynamic=False)
    steps = {fn: kwargs for fn, kwargs in compiled}
    encode, capture_step = pipeline_module._encode_step, pipeline_module._capture_step
    assert set(steps) == {encode, capture_step, iseg_ops.refine}
    assert all(k["mode"] == "reduce-overhead" and k["dynamic"] is False for k in steps.values())
    assert steps[encode]["fullgraph"] and steps[capture_step]["fullgraph"]
    pipe(image, ["cat"], generator=generator())
    assert calls == [(encode, True), (capture_step, True), (iseg_ops.refine, False)]
    assert torch.backends.cudnn.benchmark is False  # restored


def test_compiled_channels_last_whole_batch_vae_gives_the_same_heatmaps(fresh_pipe):
    """The VAE change of ``compile()`` (channels_last weights and inputs, the encoder compiled,
    the whole batch in one encoder call) gives the eager NCHW sliced outputs within fp32
    rounding (compiled with the eager backend)."""
    pipe = fresh_pipe
    images = [make_image(seed) for seed in range(3)]
    pipe.vae_batch_size = 1
    eager = pipe(images, ["cat", "dog"], generator=generator(), output_attentions=True)
    eager_latents = pipe.encode_images(pipe.check_inputs(images, None, None, None, True)[1])
    pipe.vae_batch_size = None  # the default: on CPU slices of 4, so one call for 3 images
    pipe.compile(backend="eager", dynamic=False)
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.vae.encoder.conv_in.weight.is_contiguous()
    inputs = []
    handle = pipe.vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    out = pipe(images, ["cat", "dog"], generator=generator(), output_attentions=True)
    handle.remove()
    assert [x.shape[0] for x in inputs] == [3]  # one encoder call for the batch
    assert inputs[0].is_contiguous(memory_format=torch.channels_last)
    latents = pipe.encode_images(pipe.check_inputs(images, None, None, None, True)[1])
    torch.testing.assert_close(latents, eager_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.self_attention, eager.self_attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.heatmaps, eager.heatmaps, atol=1e-5, rtol=0)
    assert torch.equal(out.labels, eager.labels)


def test_vae_slices_follow_the_free_cuda_memory(monkeypatch):
    """The whole batch where 90 % of the free memory holds the estimate, else as many images as
    it holds (at least one); 4 off CUDA. SD's VAE at 512² in fp16 (hand count): the largest
    activation is 128 × 512² fp16 (64 MiB), × 8, plus the mid-block attention's 4096² scores
    and probabilities in fp32 (128 MiB): 640 MiB per image."""
    config = type("Config", (), {"block_out_channels": (128, 256, 512, 512)})
    per_image = pipeline_module._vae_bytes_per_image(config, torch.float16, (512, 512))
    assert per_image == 640 * 2**20
    cached = {"reserved": 3 * 2**30, "allocated": 2 * 2**30}  # 1 GiB cached, reusable
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: cached["allocated"])

    def slices(free_gib, batch=8, device="cuda"):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
        shape = (batch, 3, 512, 512)
        return pipeline_module._vae_slice_size(config, torch.float16, shape, torch.device(device))

    assert slices(70) == 8  # an H100 with the model loaded: no slicing
    assert slices(5.0) == 8  # (5 + 1) GiB × 0.9 = 5.4 GiB ≥ 8 × 640 MiB
    assert slices(4.0) == 7  # 4.5 GiB: 7 images
    assert slices(0.5) == 2  # the cached GiB counts: 1.35 GiB
    assert slices(70, device="cpu") == 4  # free memory unknown: the slices of 4
    cached["reserved"] = cached["allocated"]
    assert slices(0.2) == 1  # 0.18 GiB holds no image: still one per call
