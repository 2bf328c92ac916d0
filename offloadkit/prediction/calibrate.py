"""Measuring this machine into a hardware profile: `calibrate()`.

Times host-to-device copies (pinned and pageable), device-to-host copies, a cold
sequential disk read and dense matmul throughput, and returns a `HardwareProfile`
(`offloadkit.prediction.hardware`) that `dump_hardware_yaml` writes out.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .. import progress
from ..errors import DeviceError
from .hardware import HardwareProfile, Measurement


def _host_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the kernel's "kB" is KiB
    except OSError:
        pass
    try:  # macOS and other Unixes without /proc
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        raise DeviceError("cannot read the host memory size (no /proc/meminfo, no sysconf). Write "
                            "`host_memory` into the profile by hand") from None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def _filesystem(folder: str) -> str | None:
    """The file system type holding `folder` (Linux), to tell a RAM-backed temp folder from a disk."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as handle:
            mounts = [line.split()[:3] for line in handle]
    except OSError:
        return None
    real = os.path.realpath(folder)
    best = None
    for _, point, kind in mounts:
        if real == point or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > len(best[0]):
                best = (point, kind)
    return best[1] if best else None


def _round3(value: float) -> int:
    """Three significant figures: more would be noise, and it keeps the YAML short and exact."""
    if value <= 0:
        return 1
    digits = 2 - math.floor(math.log10(value))
    return max(1, round(round(value, digits)))


def _median_seconds(action, sync, repeats: int) -> float:
    action()  # warm-up: first-touch page faults, allocator growth, kernel selection
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        action()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _device_memory(torch, device, host_memory: int) -> int:
    if device.type == "cpu":
        return host_memory
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    module = getattr(torch, device.type)
    if device.type == "mps":  # unified memory: what Metal lets one process allocate
        recommended = getattr(module, "recommended_max_memory", None)
        return int(recommended()) if recommended is not None else host_memory
    return int(module.get_device_properties(device).total_memory)


def _device_name(torch, device) -> str:
    if device.type == "cpu":
        return _cpu_name()
    module = getattr(torch, device.type)
    getter = getattr(module, "get_device_name", None)
    try:
        return str(getter(device)) if getter is not None else device.type
    except (RuntimeError, TypeError):
        return device.type


def _transfers(torch, device, sync, size: int, repeats: int, notes: list) -> tuple[float, float, float]:
    """(pinned h2d, pageable h2d, d2h) bytes/s; on the CPU, one host memcpy figure for all three."""
    pageable = torch.empty(size, dtype=torch.uint8)
    pageable.fill_(1)  # touch every page, so page faults are not timed
    if device.type == "cpu":
        target = torch.empty_like(pageable)
        rate = size / _median_seconds(lambda: target.copy_(pageable), sync, repeats)
        return rate, rate, rate
    target = torch.empty(size, dtype=torch.uint8, device=device)
    pageable_rate = size / _median_seconds(lambda: target.copy_(pageable), sync, repeats)
    try:
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pinned.fill_(1)
    except RuntimeError as exc:
        notes.append(f"could not allocate pinned host memory ({str(exc).splitlines()[0]}): h2d_pinned is the "
                     "pageable figure")
        pinned_rate = pageable_rate
    else:
        pinned_rate = size / _median_seconds(lambda: target.copy_(pinned, non_blocking=True), sync, repeats)
        del pinned
    # `module.to('cpu')` allocates fresh host memory each time; so does this.
    d2h_rate = size / _median_seconds(lambda: target.to("cpu"), sync, repeats)
    return pinned_rate, pageable_rate, d2h_rate


def _compute(torch, device, sync, quick: bool) -> tuple[float, str]:
    """Dense matmul FLOP/s: float16 on accelerators (their usual inference dtype), float32 on the CPU."""
    on_cpu = device.type == "cpu"
    dtype = torch.float32 if on_cpu else torch.float16
    n = (256 if quick else 1024) if on_cpu else (1024 if quick else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # Warm up for a while, not once: BLAS libraries pick kernels and wake their threads over several calls.
    deadline = time.perf_counter() + (0.05 if quick else 0.3)
    while time.perf_counter() < deadline:
        torch.mm(a, b)
        sync()
    one = _median_seconds(lambda: torch.mm(a, b), sync, 1)
    # Batch enough matmuls per timing that the synchronise and timer overheads do not count.
    per_batch = max(1, int((0.02 if quick else 0.2) / max(one, 1e-6)))

    def batch():
        for _ in range(per_batch):
            torch.mm(a, b)

    seconds = _median_seconds(batch, sync, 5) / per_batch
    return 2 * n**3 / seconds, "float32" if on_cpu else "float16"


def _block_efficiency(torch, device, sync, quick: bool, peak: float, dtype_name: str, notes: list) -> float:
    """The share of the matmul rate a real transformer block's forward reaches (diffusers' BasicTransformerBlock:
    attention and feed-forward, as in the denoisers), its FLOPs counted by torch's FlopCounterMode."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch.utils.flop_counter import FlopCounterMode

    on_cpu = device.type == "cpu"
    dim, tokens = ((128, 128) if quick else (512, 512)) if on_cpu else ((1024, 1024) if quick else (3072, 4096))
    heads = max(1, dim // 64)
    dtype = getattr(torch, dtype_name)
    block = BasicTransformerBlock(dim, heads, dim // heads).to(device=device, dtype=dtype).eval()
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            block(x)
        sync()
        seconds = _median_seconds(lambda: block(x), sync, 3 if quick else 10)
    efficiency = min(1.0, counter.get_total_flops() / seconds / peak)
    notes.append(f"compute_efficiency: a BasicTransformerBlock forward (width {dim}, {tokens} tokens, {dtype_name}) "
                 f"at {efficiency:.0%} of the matmul rate")
    return efficiency


def _read_seconds(path: str, view: memoryview, drop: bool) -> tuple[float, bool]:
    """Seconds to read the whole file, and whether the kernel took the request to drop it from the cache first."""
    with open(path, "rb", buffering=0) as handle:
        dropped = False
        if drop and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                dropped = True
            except OSError:
                pass
        start = time.perf_counter()
        while handle.readinto(view):
            pass
        return time.perf_counter() - start, dropped


def _disk_read(folder: str | None, size: int, repeats: int, notes: list) -> int:
    """Median bytes/s of reading a fresh file after asking the kernel to drop it from the page cache."""
    folder = folder or tempfile.gettempdir()
    kind = _filesystem(folder)
    if kind in ("tmpfs", "ramfs"):
        notes.append(f"the disk test folder {folder!r} is on {kind} (RAM): disk_read is memory speed. Pass a "
                     "folder on the disk that holds the offloaded weights")
    block = os.urandom(min(size, 4 * 2**20))  # random bytes: a compressing file system cannot shortcut them
    try:
        handle, path = tempfile.mkstemp(prefix="offloadkit-calibrate-", suffix=".bin", dir=folder)
    except OSError as exc:
        raise DeviceError(f"cannot create the disk test file in {folder!r} ({exc.strerror}). Pass a writable "
                            "folder on the disk that holds the offloaded weights") from None
    try:
        try:
            written = 0
            while written < size:
                written += os.write(handle, block[: min(len(block), size - written)])
            os.fsync(handle)  # dirty pages cannot be dropped from the cache; clean ones can
        finally:
            os.close(handle)
        view = memoryview(bytearray(16 * 2**20))
        cold = [_read_seconds(path, view, drop=True) for _ in range(repeats)]
        cached, _ = _read_seconds(path, view, drop=False)  # the page cache's speed, to judge the cold reads by
    except OSError as exc:
        raise DeviceError(f"the disk test in {folder!r} failed ({exc.strerror}). Free some space or pass "
                            "another folder") from None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    seconds = statistics.median(t for t, _ in cold)
    if not all(dropped for _, dropped in cold):
        notes.append("could not ask the kernel to drop the test file from the page cache (no posix_fadvise "
                     "here): disk_read may be the page cache's speed, not the disk's")
    elif seconds < 1.5 * cached:
        notes.append(f"the cold reads ({size / seconds / 1e9:.2f} GB/s) were nearly as fast as reads from the "
                     f"page cache ({size / cached / 1e9:.2f} GB/s): the drop may not have worked or the folder is "
                     "RAM-backed, so disk_read may be too high")
    return size / seconds


def calibrate(device: str = "auto", *, quick: bool = False, folder: str | os.PathLike | None = None,
              name: str | None = None) -> HardwareProfile:
    """Measure this machine and return its `HardwareProfile` (`nominal: false`, with a `measured` section).

    `device`: `auto` (the accelerator, or the CPU where there is none), `cpu`, `cuda`, `cuda:1`, ...
    `quick`: small buffers and few repeats (a second or two; rough figures, for tests).
    `folder`: where to write the disk test file (default: the temp folder); pick the disk that holds the
    offloaded weights. `name`: the profile's name (default: from the device's name).

    Takes about 10-20 s by default. Example::

        profile = calibrate("cuda")
        Path("hw.yaml").write_text(dump_hardware_yaml(profile))
    """
    import torch

    from .. import __version__
    from ..accelerator import detect_accelerator, resolve_device

    if str(device) == "auto":
        device = detect_accelerator() or "cpu"
    device = resolve_device(device)
    if device.type == "cpu":
        sync = lambda: None  # noqa: E731 - CPU copies and matmuls are done when they return
    else:
        module_sync = getattr(torch, device.type).synchronize
        sync = module_sync if device.type == "mps" else (lambda: module_sync(device))

    if folder is not None and not os.access(folder, os.W_OK):  # checked before the 10-20 s of measuring
        raise DeviceError(f"cannot write the disk test file in {os.fspath(folder)!r} (not a writable folder). "
                            "Pass a writable folder on the disk that holds the offloaded weights")
    transfer_size = (16 if quick else 256) * 2**20
    disk_size = (16 if quick else 512) * 2**20
    repeats = 3 if quick else 10
    notes = []
    if device.type == "cpu":
        notes.append("the device is the CPU: device_memory is host RAM, and h2d_pinned, h2d_pageable and d2h "
                     "are one host memcpy bandwidth (nothing crosses a bus)")
    if quick:
        notes.append("quick measurement (small buffers, few repeats): rough figures")

    host_memory = _host_memory()
    device_memory = _device_memory(torch, device, host_memory)
    device_name = _device_name(torch, device)
    with progress.bar("calibrating", total=4, unit=" steps") as shown:
        shown.set_postfix_str("host-device copies")
        pinned, pageable, d2h = _transfers(torch, device, sync, transfer_size, repeats, notes)
        shown.update(1)
        shown.set_postfix_str("compute")
        flops, dtype = _compute(torch, device, sync, quick)
        shown.update(1)
        shown.set_postfix_str("a transformer block")
        efficiency = _block_efficiency(torch, device, sync, quick, flops, dtype, notes)
        shown.update(1)
        shown.set_postfix_str("disk reads")
        disk = _disk_read(None if folder is None else os.fspath(folder), disk_size, 3, notes)
        shown.update(1)

    runtime = None
    if device.type != "cpu":
        if getattr(torch.version, "hip", None):
            runtime = f"ROCm {torch.version.hip}"
        elif getattr(torch.version, "cuda", None) and device.type == "cuda":
            runtime = f"CUDA {torch.version.cuda}"
        elif getattr(torch.version, "xpu", None) and device.type == "xpu":
            runtime = f"XPU {torch.version.xpu}"

    label = f"{device.type}:{device.index}" if device.type != "cpu" else "cpu"
    return HardwareProfile(
        version=1,
        name=name or (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or device.type),
        description=f"Measured by offloadkit calibrate on {device_name} ({label}).",
        nominal=False,
        device=device.type,
        device_memory=device_memory,
        host_memory=host_memory,
        h2d_pinned=_round3(pinned),
        h2d_pageable=_round3(pageable),
        d2h=_round3(d2h),
        disk_read=_round3(disk),
        compute=_round3(flops),
        compute_dtype=dtype,
        compute_efficiency=round(max(efficiency, 0.01), 2),
        measured=Measurement(
            date=datetime.now(timezone.utc).replace(microsecond=0),
            tool=f"offloadkit calibrate {__version__}",
            torch=str(torch.__version__),
            runtime=runtime,
            device_name=device_name,
            threads=torch.get_num_threads(),
            transfer_size=transfer_size,
            disk_file_size=disk_size,
            repeats=repeats,
            quick=quick,
            notes=tuple(notes),
        ),
    )
