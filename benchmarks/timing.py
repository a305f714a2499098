"""Timing a compiled train step the same way in every benchmark: warm-up steps, then blocks of
steps, each block ended by waiting for the device."""

from __future__ import annotations

import time
from typing import Any, Callable


def time_blocks(step: Callable, state: Any, batch: Any, warmup: int, steps: int,
                repeats: int) -> tuple[Any, list[float], Any]:
    """(state after all steps, seconds per step of each of `repeats` blocks of `steps` steps,
    the last step's metrics); `warmup` steps first, untimed. `step(state, batch)` returns
    (state, metrics)."""
    import jax
    metrics = None
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps)
    return state, times, metrics
