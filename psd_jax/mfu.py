"""Model FLOPs utilisation: the compiled step's FLOPs per device (XLA's cost analysis) over
the step time and the device's peak.

The peak comes from `metrics.peak_flops_per_device` when set, else from the table below by
`device_kind` (dense matmul peaks per device as the vendors state them, for the compute dtype),
else, on a CPU, from a matmul probe measured once. Unknown accelerators report no MFU (a
warning says to set the key).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device, by a substring of jax's device_kind: (bfloat16, float32).
# TPU float32 matmuls run as several bfloat16 passes: XLA's default precision uses one.
PEAK_FLOPS = (
    ('TPU v6 lite', (918e12, 918e12)),   # v6e
    ('TPU v5 lite', (197e12, 197e12)),   # v5e
    ('TPU v5', (459e12, 459e12)),        # v5p
    ('TPU v4', (275e12, 275e12)),
    ('H200', (989e12, 67e12)),           # SXM; float32 without tensor cores
    ('H100', (989e12, 67e12)),
    ('A100', (312e12, 19.5e12)),
)


def table_peak(device_kind: str, dtype: str) -> float | None:
    """The table's peak for a device kind and compute dtype ('bfloat16' | 'float32')."""
    for name, (bf16, f32) in PEAK_FLOPS:
        if name in device_kind:
            return bf16 if dtype == 'bfloat16' else f32
    return None


def probe_peak(device: jax.Device, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on `device`, the best of `repeats` (a CPU's peak is
    in no table; emulated CPU devices share the host's cores)."""
    x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops(configured: float, device: jax.Device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, where it came from) for the MFU metric."""
    if configured > 0:
        return configured, 'metrics.peak_flops_per_device'
    found = table_peak(device.device_kind, dtype)
    if found is not None:
        return found, f'the {dtype} peak of {device.device_kind}'
    if device.platform == 'cpu':
        return probe_peak(device), 'a float32 matmul probe on this CPU'
    return None, f'unknown for {device.device_kind}: set metrics.peak_flops_per_device'


def mfu(flops_per_device: float, step_time_s: float, peak: float | None) -> float | None:
    """Fraction of the peak the step used; None without FLOPs or a peak."""
    if not flops_per_device or not peak or step_time_s <= 0:
        return None
    return flops_per_device / step_time_s / peak


def step_flops(compiled) -> float:
    """FLOPs per device of a compiled program (XLA's cost analysis; 0 when it has none). A
    scanned loop's body is counted once, so scanned layers undercount."""
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get('flops', 0.0))
