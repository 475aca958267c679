"""Per-stage wall-clock timing of a pipeline call, for benchmarks (off by default)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

STAGES = ("text", "vae", "unet", "ops", "post")


class StageTimer:
    """Seconds spent in each stage of the calls made while :meth:`recording`.

    Disabled, a stage costs nothing; enabled, each stage synchronises the device before and
    after it (so only an instrumented call, not a timed one, should record).

    Example:
        >>> with pipe.stage_timer.recording() as seconds:
        ...     pipe(image, ["cat"])
        >>> seconds  # {"text": ..., "vae": ..., "unet": ..., "ops": ..., "post": ...}
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, float]]:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        try:
            yield self.seconds
        finally:
            self.seconds = None

    @contextlib.contextmanager
    def __call__(self, stage: str, device: torch.device) -> Iterator[None]:
        if self.seconds is None:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[stage] += time.perf_counter() - start
