"""Model FLOPs utilisation (MFU) and hardware FLOPs utilisation (HFU).

`mfu`: the architecture's FLOPs per step (psd_jax/training/flops.py: forward + backward of both
towers and the similarity matrix, plus a teacher's forward) per device, over the step time and
the device's peak for the compute dtype, the figure papers and maxtext report. `hfu`: XLA's
count of what the compiled program does (remat's recomputation included; a scanned stack's body
counted once), over the same.

The peak comes from `metrics.peak_flops_per_device` when set, else from the table below by
`device_kind`, else, on a CPU, from a matmul probe measured once. Unknown accelerators report
no MFU (a warning says to set the key).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device (one chip: JAX presents a v4 / v5p megacore chip as one
# device), by a substring of jax's device_kind: (bfloat16, tensorfloat32, float32).
# TPUs run float32 matmuls as bfloat16 passes (XLA's default precision: one pass); NVIDIA
# GPUs run them as TF32 unless jax_default_matmul_precision asks for 'highest'.
PEAK_FLOPS = (
    ('TPU v6 lite', (918e12, 918e12, 918e12)),   # v6e
    ('TPU v5 lite', (197e12, 197e12, 197e12)),   # v5e
    ('TPU v5', (459e12, 459e12, 459e12)),        # v5p
    ('TPU v4', (275e12, 275e12, 275e12)),
    ('H200', (989e12, 494e12, 67e12)),           # SXM, dense (no sparsity)
    ('H100', (989e12, 494e12, 67e12)),
    ('A100', (312e12, 156e12, 19.5e12)),
)
FULL_FLOAT32 = ('highest', 'float32', 'fastest_float32_matmul')  # precisions without TF32


def float32_matmul_mode() -> str:
    """'float32' when jax_default_matmul_precision asks for full float32 matmuls, else
    'tensorfloat32' (JAX's default on NVIDIA GPUs)."""
    setting = str(jax.config.jax_default_matmul_precision or '').lower()
    return 'float32' if setting in FULL_FLOAT32 else 'tensorfloat32'


def table_peak(device_kind: str, dtype: str) -> float | None:
    """The table's peak for a device kind and compute dtype ('bfloat16', 'float32' (as the
    default precision runs it) or 'tensorfloat32')."""
    if dtype == 'float32':
        dtype = float32_matmul_mode()
    column = {'bfloat16': 0, 'tensorfloat32': 1, 'float32': 2}[dtype]
    for name, peaks in PEAK_FLOPS:
        if name in device_kind:
            return peaks[column]
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
    """(peak FLOP/s per device or None, where it came from) for the MFU metric; `dtype` is
    model.dtype (float32 compute reads the TF32 peak on NVIDIA GPUs unless JAX's matmul
    precision is 'highest')."""
    if configured > 0:
        return configured, 'metrics.peak_flops_per_device'
    found = table_peak(device.device_kind, dtype)
    if found is not None:
        shown = float32_matmul_mode() if dtype == 'float32' else dtype
        return found, f'the {shown} peak of {device.device_kind}'
    if device.platform == 'cpu':
        return probe_peak(device), 'a float32 matmul probe on this CPU'
    return None, f'unknown for {device.device_kind}: set metrics.peak_flops_per_device'


def mfu(flops_per_device: float, step_time_s: float, peak: float | None) -> float | None:
    """Fraction of the peak the step used; None without FLOPs or a peak."""
    if not flops_per_device or not peak or step_time_s <= 0:
        return None
    return flops_per_device / step_time_s / peak


def step_flops(compiled) -> float:
    """FLOPs per device of a compiled program (XLA's cost analysis; 0 when it has none): the
    hardware count behind `hfu`. A scanned loop's body is counted once, so scanned layers
    undercount; remat's recomputation is counted."""
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get('flops', 0.0))
