"""Hardware profiles: what a machine can hold and how fast it moves bytes.

A profile is a small YAML file (device memory, host RAM, host-to-device and disk
bandwidth, optionally compute throughput) that plans are predicted against. It is
read like a policy (positions kept, every problem located and reported at once),
some common cards ship as built-ins with nominal spec-sheet values, and
`calibrate()` measures the local machine.

No torch import at module level: loading and validating a profile stays light;
only `calibrate()` imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, \
    WithJsonSchema, field_validator

from .errors import DeviceError, HardwareError, PolicyError
from .loading import _locate, _positions_of, _read_source, _translate
from .schema import BYTES_PATTERN, VersionOne, parse_bytes
from .yaml_source import YamlDocument

BUILTIN_PACKAGE = "offloadkit.hardware_profiles"
SCHEMA_ID = "https://offloadkit.dev/schemas/hardware.schema.json"

# --- units ---------------------------------------------------------------------------------------

_NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
# Bytes per second; a capital B only, since `Gb/s` (bits) is a common slip worth refusing.
BANDWIDTH_PATTERN = rf"^\s*{_NUMBER}\s*(([kKmMgGtT]i?)?B/s)?\s*$"
COMPUTE_PATTERN = rf"^\s*{_NUMBER}\s*([kKmMgGtTpP]?[fF][lL][oO][pP]([sS]|/s))?\s*$"
_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _split_number(value, pattern: str, what: str, example: str) -> tuple[float, str] | None:
    """(number, unit) of a positive quantity; None when text does not match `pattern` (the caller says why)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {what} such as {example!r}, not {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value)
        if not re.match(pattern, text):
            return None
        match = re.match(rf"^\s*({_NUMBER})\s*(\S*)\s*$", text)
        number, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be a finite positive number, not {value!r}")
    return number, unit


def parse_bandwidth(value) -> int:
    """Bytes per second from `25GB/s`, `12.5 GiB/s`, `800MB/s` or a plain number of bytes per second.

    Example: ``parse_bandwidth("12.5GB/s") -> 12500000000``.
    """
    split = _split_number(value, BANDWIDTH_PATTERN, "a bandwidth", "25GB/s")
    if split is None:
        if re.search(r"[0-9\s]([kKmMgGtT]i?)?(b/s|bps|bit/s)\s*$", str(value)):
            raise ValueError(f"{value!r} looks like bits per second. Write bytes per second with a capital B, "
                             "e.g. '25GB/s' (1 GB/s = 8 Gb/s)")
        raise ValueError(f"cannot read {value!r} as a bandwidth. Write bytes per second, e.g. '25GB/s', "
                         "'12.5GiB/s', '800MB/s' or a plain number")
    number, unit = split
    if isinstance(value, int):
        return value  # exact, however large; only text goes through a float
    prefix = unit[:-3].lower() if unit else ""
    return round(number * _PREFIXES[prefix])


def parse_compute(value) -> int:
    """FLOP/s from `82TFLOPS`, `82 TFLOP/s`, `950GFLOPS` or a plain number of FLOP/s.

    Example: ``parse_compute("82.6 TFLOP/s") -> 82600000000000``.
    """
    split = _split_number(value, COMPUTE_PATTERN, "a compute throughput", "82TFLOPS")
    if split is None:
        raise ValueError(f"cannot read {value!r} as a compute throughput. Write FLOP per second, e.g. "
                         "'82TFLOPS', '82 TFLOP/s', '950GFLOPS' or a plain number")
    number, unit = split
    if isinstance(value, int):
        return value
    prefix = re.sub(r"(?i)flop(s|/s)$", "", unit).lower()
    return round(number * _PREFIXES[prefix])


Size = Annotated[int, BeforeValidator(parse_bytes), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": BYTES_PATTERN}]})]
Bandwidth = Annotated[int, BeforeValidator(parse_bandwidth), WithJsonSchema(
    {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": BANDWIDTH_PATTERN}]})]
Compute = Annotated[int, BeforeValidator(parse_compute), WithJsonSchema(
    {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": COMPUTE_PATTERN}]})]

DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "npu", "mlu", "hpu", "musa", "privateuseone")


def _device_type(value):
    text = str(value)
    if text in DEVICE_TYPES:
        return text
    if text.split(":")[0] in DEVICE_TYPES:
        raise ValueError(f"device {text!r} has an index; a profile is about a device type. Write "
                         f"`device: {text.split(':')[0]}`")
    listed = ", ".join(repr(t) for t in DEVICE_TYPES)
    raise ValueError(f"unknown device type {value!r}. Use 'cuda' for NVIDIA and AMD (ROCm) GPUs, or one of "
                     f"{listed}")


DeviceType = Annotated[str, BeforeValidator(_device_type), WithJsonSchema({"enum": list(DEVICE_TYPES)})]


# --- the model -----------------------------------------------------------------------------------

class Measurement(BaseModel):
    """How a profile was measured: when, with what, and the caveats found while measuring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    date: AwareDatetime = Field(description="When it was measured, ISO 8601 with a time zone, e.g. "
                                "`2025-06-01T12:00:00Z`.")
    tool: str | None = Field(None, description="What measured it, e.g. `offloadkit calibrate 0.1.0`.")
    torch: str | None = Field(None, description="torch version used (`torch.__version__`).")
    runtime: str | None = Field(None, description="Accelerator runtime torch was built with, e.g. `CUDA 12.8`.")
    device_name: str | None = Field(None, description="The measured device as its driver names it (the CPU "
                                    "model for a CPU profile).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads during the measurement (CPU "
                                "compute and host copies depend on it).")
    transfer_size: Size | None = Field(None, description="Bytes per timed copy for the bandwidth figures.")
    disk_file_size: Size | None = Field(None, description="Size of the file read for `disk_read`.")
    repeats: int | None = Field(None, ge=1, description="Timed copies per transfer figure, which is their median "
                                "(disk: median of 3 cold reads; compute: median of 5 timed batches of matmuls).")
    quick: bool = Field(False, description="Measured with small buffers (`quick=True`): rough figures.")
    notes: tuple[str, ...] = Field((), description="Caveats, e.g. a CPU 'device' or a page cache that could "
                                   "not be dropped before the disk read.")


class HardwareProfile(BaseModel):
    """What a machine holds and how fast it moves bytes, for predicting a policy's cost.

    Example::

        profile = load_hardware("rtx-4090-24gb")
        profile.device_memory          # 25769803776 (24GiB)
        profile.h2d_pinned / 1e9       # 25.2 (GB/s)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="offloadkit hardware profile",
                              json_schema_extra={"$id": SCHEMA_ID})

    version: VersionOne = Field(description="Hardware profile format version. Always 1.")
    name: str = Field(description="Short name shown in predictions, e.g. `rtx-4090-24gb`.")
    description: str | None = Field(None, description="What machine or card this is.")
    nominal: bool = Field(False, description="True: values come from spec sheets and stated assumptions, not "
                          "measured on a machine. False: measured (see `measured`).")
    device: DeviceType = Field(description="Device type the profile is about: `cuda`, `cpu`, `xpu`, `mps`, ... "
                               "(a CPU profile describes the CPU as the 'device').")
    device_memory: Size = Field(description="Total device memory, e.g. `24GiB` (as the driver reports it when "
                                "measured; the spec-sheet size when nominal).")
    host_memory: Size = Field(description="Host RAM, e.g. `64GiB`.")
    h2d_pinned: Bandwidth = Field(description="Host-to-device bandwidth from page-locked (pinned) host memory, "
                                  "e.g. `25GB/s`.")
    h2d_pageable: Bandwidth = Field(description="Host-to-device bandwidth from ordinary (pageable) host memory, "
                                    "as `module.to(device)` copies, e.g. `12GB/s`.")
    d2h: Bandwidth | None = Field(None, description="Device-to-host bandwidth into ordinary host memory, as "
                                  "`module.to('cpu')` copies, e.g. `12GB/s`.")
    disk_read: Bandwidth = Field(description="Sequential read bandwidth of the disk that holds offloaded weights, "
                                 "from outside the page cache, e.g. `3GB/s`.")
    compute: Compute | None = Field(None, description="Dense matrix-multiply throughput in `compute_dtype`, "
                                    "e.g. `82TFLOPS`.")
    compute_dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="dtype the `compute` figure is for (float16 on accelerators, float32 on a CPU).")
    measured: Measurement | None = Field(None, description="How and when the values were measured; absent on "
                                         "nominal profiles.")

    @field_validator("measured")
    @classmethod
    def _not_both(cls, value, info):
        if value is not None and info.data.get("nominal"):
            raise ValueError("a nominal profile (spec-sheet values) cannot have a `measured` section. Remove "
                             "`measured`, or set `nominal: false` if the values were measured")
        return value


def hardware_json_schema() -> dict:
    """The JSON Schema of a hardware profile file, for editors.

    Example: ``json.dumps(hardware_json_schema(), indent=2)``.
    """
    schema = HardwareProfile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# --- loading -------------------------------------------------------------------------------------

def _builtin_folder():
    try:
        return resources.files(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        # An editable install made before `hardware/` existed maps no package to it; read the checkout.
        return Path(__file__).resolve().parent.parent / "hardware"


def _builtin_profiles() -> dict:
    found = {}
    for entry in _builtin_folder().iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            found[entry.name.rsplit(".", 1)[0]] = entry
    return dict(sorted(found.items()))


def hardware_names() -> list[str]:
    """Names of the built-in hardware profiles (nominal spec-sheet values).

    Example: ``"rtx-4090-24gb" in hardware_names()``.
    """
    return list(_builtin_profiles())


def load_hardware(source) -> HardwareProfile:
    """Load and validate a hardware profile from a YAML path, a built-in name, a dict or a profile.

    Example::

        profile = load_hardware("hw.yaml")
        profile = load_hardware("rtx-4090-24gb")
        profile = load_hardware({"version": 1, "name": "box", "device": "cuda", "device_memory": "24GiB",
                                 "host_memory": "64GiB", "h2d_pinned": "25GB/s",
                                 "h2d_pageable": "12GB/s", "disk_read": "3GB/s"})

    Raises `HardwareError` listing every problem with its `file:line:col`.
    """
    if isinstance(source, HardwareProfile):
        return source
    try:
        if isinstance(source, dict):
            doc = YamlDocument(source, "<dict>")
        elif isinstance(source, (str, os.PathLike)):
            doc, _, _ = _read_source(source, Path.cwd(), None, builtins=_builtin_profiles(),
                                     what="hardware profile")
        else:
            raise HardwareError(f"cannot load a hardware profile from {type(source).__name__} {source!r}. "
                                "Pass a file path, a built-in name, a dict or a HardwareProfile")
        return _validate(doc)
    except HardwareError:
        raise
    except PolicyError as exc:  # the shared YAML reader speaks of policies' errors; same problems, our type
        raise HardwareError(exc.problems) from None


def _validate(doc: YamlDocument) -> HardwareProfile:
    positions = _positions_of(doc)
    if not isinstance(doc.data, dict):
        kind = type(doc.data).__name__ if doc.data is not None else "null"
        raise HardwareError(_locate(positions, (), f"a hardware profile must be a mapping of keys such as "
                                                   f"`version: 1`, not a {kind}. Start the file with `version: 1`",
                                    False, doc.source))
    try:
        return HardwareProfile.model_validate(doc.data)
    except ValidationError as exc:
        raise HardwareError(_translate(exc, doc.data, positions, doc.source, allowed_keys=_allowed_keys)) from None


def _allowed_keys(path: tuple, data) -> list[str]:
    if path == ():
        return list(HardwareProfile.model_fields)
    if path == ("measured",):
        return list(Measurement.model_fields)
    return []


# --- writing -------------------------------------------------------------------------------------

def _format_size(value: int) -> tuple[str, str]:
    """(text that parses back to exactly `value`, a comment with the size in GiB when the text is not in GiB)."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value < factor:
            continue
        for decimals in range(7):
            text = f"{value / factor:.{decimals}f}{unit}"
            if parse_bytes(text) == value:
                return text, "" if unit == "GiB" else f"{value / 2**30:.2f} GiB"
    return str(value), f"{value / 2**30:.2f} GiB"


def _format_rate(value: int, unit: str, parse, largest: int = 12) -> str:
    """The largest decimal prefix (`12.3GB/s`, `82.6TFLOP/s`), with only as many digits as it takes to be exact."""
    for prefix, exponent in (("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3)):
        if value >= 10**exponent and exponent <= largest:
            for decimals in range(exponent + 1):
                text = f"{value / 10**exponent:.{decimals}f}{prefix}{unit}"
                if parse(text) == value:
                    return text
            break
    return str(value)


def _scalar(value) -> str:
    """A YAML scalar for a string: plain where that reads back as the same string, else JSON-quoted."""
    import yaml

    text = str(value)
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9 ._()+/-]*", text) and not text.endswith(" ") \
            and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def dump_hardware_yaml(profile: HardwareProfile) -> str:
    """A profile as readable YAML (human units, a header saying what it is) that `load_hardware` reads back equal.

    Example::

        profile = calibrate()
        Path("hw.yaml").write_text(dump_hardware_yaml(profile))
        assert load_hardware("hw.yaml") == profile
    """
    m = profile.measured
    header = ["# offloadkit hardware profile: what this machine holds and how fast it moves bytes."]
    if profile.nominal:
        header.append("# Nominal values (spec sheets and stated assumptions), not measured on a machine.")
    if m is not None:
        made = f" by {m.tool}" if m.tool else ""
        header.append(f"# Measured{made} on {m.date.isoformat().replace('+00:00', 'Z')}"
                      + (f" with torch {m.torch}" if m.torch else "")
                      + (f" on {profile.device}: {m.device_name}" if m.device_name else "") + ".")
        if m.repeats and m.transfer_size:
            header.append(f"# Transfers: median of {m.repeats} timed copies of {_format_size(m.transfer_size)[0]}.")
        if m.disk_file_size:
            header.append(f"# Disk: median of cold reads of a {_format_size(m.disk_file_size)[0]} file, dropped "
                          "from the page cache before each.")
        header.extend(f"# Note: {note}" for note in m.notes)
    header.append("# Edit values you know better; `offloadkit validate --hardware FILE` reads this file.")

    lines = [f"version: {profile.version}", f"name: {_scalar(profile.name)}"]
    if profile.description is not None:
        lines.append(f"description: {_scalar(profile.description)}")
    lines += [f"nominal: {'true' if profile.nominal else 'false'}", f"device: {profile.device}"]
    for key in ("device_memory", "host_memory"):
        text, comment = _format_size(getattr(profile, key))
        lines.append(f"{key}: {text}" + (f"  # {comment}" if comment else ""))
    for key in ("h2d_pinned", "h2d_pageable", "d2h", "disk_read"):
        if getattr(profile, key) is not None:
            lines.append(f"{key}: {_format_rate(getattr(profile, key), 'B/s', parse_bandwidth)}")
    if profile.compute is not None:
        lines.append(f"compute: {_format_rate(profile.compute, 'FLOP/s', parse_compute, largest=15)}")
    if profile.compute_dtype is not None:
        lines.append(f"compute_dtype: {profile.compute_dtype}")
    if m is not None:
        lines.append("measured:")
        lines.append(f"  date: {_scalar(m.date.isoformat().replace('+00:00', 'Z'))}")
        for key in ("tool", "torch", "runtime", "device_name"):
            if getattr(m, key) is not None:
                lines.append(f"  {key}: {_scalar(getattr(m, key))}")
        for key in ("threads", "repeats"):
            if getattr(m, key) is not None:
                lines.append(f"  {key}: {getattr(m, key)}")
        for key in ("transfer_size", "disk_file_size"):
            if getattr(m, key) is not None:
                lines.append(f"  {key}: {_format_size(getattr(m, key))[0]}")
        lines.append(f"  quick: {'true' if m.quick else 'false'}")
        if m.notes:
            lines.append("  notes:")
            lines.extend(f"    - {json.dumps(note, ensure_ascii=False)}" for note in m.notes)
    return "\n".join(header + lines) + "\n"


# --- measuring -----------------------------------------------------------------------------------

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

    from . import __version__
    from .device import detect_accelerator, resolve_device

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
    pinned, pageable, d2h = _transfers(torch, device, sync, transfer_size, repeats, notes)
    flops, dtype = _compute(torch, device, sync, quick)
    disk = _disk_read(None if folder is None else os.fspath(folder), disk_size, 3, notes)

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
