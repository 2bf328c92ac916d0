"""Hardware profiles: what a machine can hold and how fast it moves bytes.

A profile is a small YAML file (device memory, host RAM, host-to-device and disk
bandwidth, optionally compute throughput) that plans are predicted against. It is
read like a policy (positions kept, every problem located and reported at once),
some common cards ship as built-ins with nominal spec-sheet values, and
`offloadkit.prediction.calibrate` measures the local machine.

No torch import: loading and validating a profile stays light.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, \
    WithJsonSchema, field_validator

from ..device import DEVICE_TYPES, Device
from ..errors import DeviceError, HardwareError
from ..policy.documents import DocumentKind, builtin_documents, locate, positions_of, read_source, translate
from ..policy.loading import HARDWARE_PROFILE_KEYS, POLICY_ONLY_KEYS
from ..policy.schema import VersionOne
from ..policy.yaml_source import YamlDocument
from ..units import Bandwidth, Compute, Share, Size, exact_size, format_rate, parse_bandwidth, parse_compute

BUILTIN_PACKAGE = "offloadkit.prediction.builtin_hardware"
# Relative (resolved against where the file is read from): offloadkit owns no web domain to host it.
SCHEMA_ID = "hardware.schema.json"


def _device_type(value):
    text = str(value)
    if text in DEVICE_TYPES:
        return text
    try:
        device = Device.parse(text)
    except DeviceError:
        device = None
    if device is not None and not device.is_auto:
        raise ValueError(f"device {text!r} has an index; a profile is about a device type. Write "
                         f"`device: {device.type}`")
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
    compute_efficiency: float = Field(
        0.5, gt=0, le=1, description="Share of `compute` a diffusion model's forward reaches (matrix multiplies "
        "of its shapes, attention, the elementwise work between them), for predicted compute times. 0.5 is an "
        "assumption, not a measurement.")
    measured: Measurement | None = Field(None, description="How and when the values were measured; absent on "
                                         "nominal profiles.")
    device_headroom: Share = Field("5%", description="Device memory kept free beyond the runtime's own overhead "
                                   "(fragmentation, other processes), a size or a share of `device_memory`.")
    host_headroom: Share = Field("10%", description="Host RAM kept free for the system, the Python process and "
                                 "everything that is not weights, a size or a share of `host_memory`.")
    pinned_memory: Share = Field("50%", description="Most host RAM that may be page-locked, a size or a share of "
                                 "`host_memory` (Linux lets about half be pinned comfortably; Windows less).")
    disk_free: Size | None = Field(None, description="Free space where offloaded weights' files go (`disk`, "
                                   "`stream` with `from: disk`); unset: not checked.")

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

def _builtin_profiles() -> dict:
    return builtin_documents(BUILTIN_PACKAGE)


HARDWARE_PROFILE = DocumentKind("hardware profile", "hardware profiles", _builtin_profiles, HardwareError)


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
    if isinstance(source, dict):
        doc = YamlDocument(source, "<dict>")
    elif isinstance(source, (str, os.PathLike)):
        doc, _, _ = read_source(source, Path.cwd(), None, HARDWARE_PROFILE)
    else:
        raise HardwareError(f"cannot load a hardware profile from {type(source).__name__} {source!r}. "
                            "Pass a file path, a built-in name, a dict or a HardwareProfile")
    return _validate(doc)


def _validate(doc: YamlDocument) -> HardwareProfile:
    positions = positions_of(doc)
    if not isinstance(doc.data, dict):
        kind = type(doc.data).__name__ if doc.data is not None else "null"
        raise HardwareError(locate(positions, (), f"a hardware profile must be a mapping of keys such as "
                                                   f"`version: 1`, not a {kind}. Start the file with `version: 1`",
                                    False, doc.source))
    policy_keys = [k for k in doc.data if k in POLICY_ONLY_KEYS]
    if policy_keys and not any(k in HARDWARE_PROFILE_KEYS for k in doc.data):
        # a policy in the profile's place: one problem, not "missing `device_memory`" and the like
        listed = ", ".join(f"`{k}`" for k in policy_keys[:3])
        raise HardwareError(locate(positions, (), f"this is a policy, not a hardware profile (it has {listed}). "
                                                   "Pass it as the policy (`offloadkit validate FILE`), and a built-in "
                                                   "profile name (`offloadkit list`) or a file written by "
                                                   "`offloadkit calibrate` as --hardware", False, doc.source))
    try:
        return HardwareProfile.model_validate(doc.data)
    except ValidationError as exc:
        raise HardwareError(translate(exc, doc.data, positions, doc.source, _allowed_keys)) from None


def _allowed_keys(path: tuple, data) -> list[str]:
    if path == ():
        return list(HardwareProfile.model_fields)
    if path == ("measured",):
        return list(Measurement.model_fields)
    return []


# --- writing -------------------------------------------------------------------------------------

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
            header.append(f"# Transfers: median of {m.repeats} timed copies of {exact_size(m.transfer_size)[0]}.")
        if m.disk_file_size:
            header.append(f"# Disk: median of cold reads of a {exact_size(m.disk_file_size)[0]} file, dropped "
                          "from the page cache before each.")
        header.extend(f"# Note: {note}" for note in m.notes)
    header.append("# Edit values you know better; `offloadkit validate --hardware FILE` reads this file.")

    lines = [f"version: {profile.version}", f"name: {_scalar(profile.name)}"]
    if profile.description is not None:
        lines.append(f"description: {_scalar(profile.description)}")
    lines += [f"nominal: {'true' if profile.nominal else 'false'}", f"device: {profile.device}"]
    for key in ("device_memory", "host_memory"):
        text, comment = exact_size(getattr(profile, key))
        lines.append(f"{key}: {text}" + (f"  # {comment}" if comment else ""))
    for key in ("h2d_pinned", "h2d_pageable", "d2h", "disk_read"):
        if getattr(profile, key) is not None:
            lines.append(f"{key}: {format_rate(getattr(profile, key), 'B/s', parse_bandwidth)}")
    if profile.compute is not None:
        lines.append(f"compute: {format_rate(profile.compute, 'FLOP/s', parse_compute, largest=15)}")
    if profile.compute_dtype is not None:
        lines.append(f"compute_dtype: {profile.compute_dtype}")
    lines.append(f"compute_efficiency: {profile.compute_efficiency}")
    for key in ("device_headroom", "host_headroom", "pinned_memory"):
        lines.append(f"{key}: {_scalar(str(getattr(profile, key)))}")
    if profile.disk_free is not None:
        lines.append(f"disk_free: {exact_size(profile.disk_free)[0]}")
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
                lines.append(f"  {key}: {exact_size(getattr(m, key))[0]}")
        lines.append(f"  quick: {'true' if m.quick else 'false'}")
        if m.notes:
            lines.append("  notes:")
            lines.extend(f"    - {json.dumps(note, ensure_ascii=False)}" for note in m.notes)
    return "\n".join(header + lines) + "\n"
