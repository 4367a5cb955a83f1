"""Memory per device, in one place for the AOT report and the startup remat search: what one device
may use (an accelerator's allocator limit; on a CPU, an equal share of the host's RAM) and the
peak of a compiled program (`compiled.memory_analysis()`, XLA's CompiledMemoryStats).

XLA:TPU's `peak_memory_in_bytes` is the heap-simulated peak over the compiled schedule, arguments
and outputs included, and is what XLA:TPU itself checks against HBM; its `temp_size_in_bytes`
is not a liveness-aware temporaries figure (see MEMORY_FIELDS and qwen3_jax/aot.py).
"""

from __future__ import annotations

import os

import jax

GIB = 1024 ** 3
# report key -> meaning of the memory numbers (written into the JSON report)
MEMORY_FIELDS = {
    "bytes_per_chip_peak": "XLA peak_memory_in_bytes: heap-simulated peak of HBM over the compiled schedule, "
                           "arguments and outputs included; what XLA:TPU checks against HBM; `fits` uses it",
    "bytes_per_chip_arguments": "argument_size_in_bytes: train state + batch, resident for the whole step",
    "bytes_per_chip_output": "output_size_in_bytes: new train state + metrics",
    "bytes_per_chip_alias": "alias_size_in_bytes: outputs written into donated argument buffers (the state)",
    "bytes_per_chip_temp_at_peak": "peak - arguments - (output - alias): temporaries live at the peak",
    "bytes_per_chip_temp": "XLA temp_size_in_bytes as libtpu reports it: larger than the temp allocation "
                           "(it counts the layer scan's stacked buffers a second time), so arguments + temp "
                           "overstate what the step needs; not used for `fits`",
}


def cpu_device_memory() -> int:
    """The host's RAM shared equally by this process's CPU devices: what one CPU device may use."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(len(jax.local_devices(backend="cpu")), 1)


def format_bytes(nbytes: float) -> str:
    """'1.50 GiB' / '12.0 MiB'."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def device_memory_bytes(device) -> int | None:
    """Memory one device may use: the allocator's limit on an accelerator; on a CPU, the host's RAM
    shared equally by its CPU devices (`cpu_device_memory`, as the AOT tool's `--topology cpu`).
    None when unknown."""
    if device.platform == "cpu":
        return cpu_device_memory()
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  topology devices (AOT) have no allocator
        return None
    return stats.get("bytes_limit")


def peak_bytes(mem, platform: str) -> tuple[int, str]:
    """(peak bytes per device, where the figure comes from) of a compiled program's memory_analysis()."""
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if peak and platform != "cpu":
        return peak, "xla peak_memory_in_bytes"
    # XLA:CPU's peak leaves out its temp allocation
    live_io = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return live_io + mem.temp_size_in_bytes, "upper bound: arguments + output - alias + temp"
