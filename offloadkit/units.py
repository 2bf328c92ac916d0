"""Quantities offloadkit reads and shows: byte sizes, bandwidths, FLOP/s and dtypes. No torch.

Each is parsed in one place (`parse_bytes`, `parse_bandwidth`, `parse_compute`,
`dtype_name`) and shown in one place (`format_bytes`, `exact_size`, `format_rate`).
The pydantic types (`Size`, `Bandwidth`, `Compute`) are what policies and hardware
profiles declare their fields with, so a size means the same in both.

Example::

    parse_bytes("7.5GB")        # 7500000000
    format_bytes(8 * 2**30)     # '8.0 GiB'
    parse_bandwidth("25GB/s")   # 25000000000
    dtype_size("bf16")          # 2
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema

from .errors import DtypeError, quoted

# --- byte sizes ----------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTES_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]i?[bB]|[bB])?\s*$"


def parse_bytes(value) -> int:
    """`8GiB`, `7.5 GB`, `512MiB` or a plain positive integer number of bytes (a bool is refused)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '8GiB', not {quoted(value)}. Write a number of bytes or a "
                         "number with a unit, e.g. '8GiB', '7.5GB' or '512MiB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, not {quoted(value)}. Write a number of bytes above 0 or a "
                             "size such as '8GiB'")
        return value
    match = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read {quoted(value)} as a size. Write e.g. '8GiB', '7.5GB' or '512MiB'")
    number = float(match.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(number):  # 310 digits are past a float's range
        raise ValueError(f"size {quoted(value)} is too large to be a size. Write e.g. '8GiB', '7.5GB' or '512MiB'")
    size = int(number)
    if size <= 0:
        raise ValueError(f"a size must be positive, not {quoted(value)}. Write a size above 0 bytes, such as "
                         "'8GiB'")
    return size


def format_bytes(count: int | None) -> str:
    """A size as people read it: `512 B`, `1.5 KiB`, `8.0 GiB`; `-` for None."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def exact_size(value: int) -> tuple[str, str]:
    """(text that parses back to exactly `value`, a comment with the size in GiB when the text is not in GiB)."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value < factor:
            continue
        for decimals in range(7):
            text = f"{value / factor:.{decimals}f}{unit}"
            if parse_bytes(text) == value:
                return text, "" if unit == "GiB" else f"{value / 2**30:.2f} GiB"
    return str(value), f"{value / 2**30:.2f} GiB"


# --- rates ---------------------------------------------------------------------------------------

_NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
# Bytes per second; a capital B only, since `Gb/s` (bits) is a common slip worth refusing.
BANDWIDTH_PATTERN = rf"^\s*{_NUMBER}\s*(([kKmMgGtT]i?)?B/s)?\s*$"
COMPUTE_PATTERN = rf"^\s*{_NUMBER}\s*([kKmMgGtTpP]?[fF][lL][oO][pP]([sS]|/s))?\s*$"
_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _split_number(value, pattern: str, what: str, example: str) -> tuple[float, str] | None:
    """(number, unit) of a positive quantity; None when text does not match `pattern` (the caller says why)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {what} such as {example!r}, not {quoted(value)}. Write one such as "
                         f"{example!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value)
        if not re.match(pattern, text):
            return None
        match = re.match(rf"^\s*({_NUMBER})\s*(\S*)\s*$", text)
        number, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be a finite positive number, not {quoted(value)}. Write one such as "
                         f"{example!r}")
    return number, unit


def parse_bandwidth(value) -> int:
    """Bytes per second from `25GB/s`, `12.5 GiB/s`, `800MB/s` or a plain number of bytes per second.

    Example: ``parse_bandwidth("12.5GB/s") -> 12500000000``.
    """
    split = _split_number(value, BANDWIDTH_PATTERN, "a bandwidth", "25GB/s")
    if split is None:
        if re.search(r"[0-9\s]([kKmMgGtT]i?)?(b/s|bps|bit/s)\s*$", str(value)):
            raise ValueError(f"{quoted(value)} looks like bits per second. Write bytes per second with a capital B, "
                             "e.g. '25GB/s' (1 GB/s = 8 Gb/s)")
        raise ValueError(f"cannot read {quoted(value)} as a bandwidth. Write bytes per second, e.g. '25GB/s', "
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
        raise ValueError(f"cannot read {quoted(value)} as a compute throughput. Write FLOP per second, e.g. "
                         "'82TFLOPS', '82 TFLOP/s', '950GFLOPS' or a plain number")
    number, unit = split
    if isinstance(value, int):
        return value
    prefix = re.sub(r"(?i)flop(s|/s)$", "", unit).lower()
    return round(number * _PREFIXES[prefix])


def format_rate(value: int, unit: str, parse, largest: int = 12) -> str:
    """The largest decimal prefix (`12.3GB/s`, `82.6TFLOP/s`), with only as many digits as it takes to be exact."""
    for prefix, exponent in (("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3)):
        if value >= 10**exponent and exponent <= largest:
            for decimals in range(exponent + 1):
                text = f"{value / 10**exponent:.{decimals}f}{prefix}{unit}"
                if parse(text) == value:
                    return text
            break
    return str(value)


# --- shares: a size or a percentage of something known later (the device, host RAM) -----------

PERCENT_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*%\s*$"


def parse_share(value) -> tuple[str, float]:
    """`"40%"` -> ("fraction", 0.4); `"6GiB"` or 6442450944 -> ("bytes", 6442450944). Anything else refused."""
    if isinstance(value, str) and value.strip().endswith("%"):
        match = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$", value)
        if not match or float(match.group(1)) > 100:
            raise ValueError(f"cannot read {quoted(value)} as a percentage. Write e.g. '40%' (0 to 100)")
        return "fraction", float(match.group(1)) / 100
    try:
        return "bytes", parse_bytes(value)
    except ValueError:
        raise ValueError(f"cannot read {quoted(value)} as a size or a percentage. Write e.g. '6GiB' or '40%'") from None


def share_bytes(value, whole: int) -> int:
    """The bytes a share stands for, out of `whole` bytes."""
    kind, amount = parse_share(value)
    return int(whole * amount) if kind == "fraction" else int(amount)


def _checked_share(value):
    parse_share(value)
    return value


def _auto_or_share(value):
    if value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected `auto`, a size such as '8GiB' or a percentage such as '40%', not "
                         f"{quoted(value)}. Write one of those")
    try:
        return _checked_share(value)
    except ValueError:
        raise ValueError(f"cannot read {quoted(value)}. Write `auto`, a size such as '8GiB' or a percentage such as "
                         "'40%'") from None


# --- the pydantic field types --------------------------------------------------------------------

Size = Annotated[int, BeforeValidator(parse_bytes), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": BYTES_PATTERN}]})]
# A size or a percentage, kept as written (what it stands for is known only later: see `share_bytes`).
Share = Annotated[int | str, AfterValidator(_checked_share), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": BYTES_PATTERN},
               {"type": "string", "pattern": PERCENT_PATTERN}]})]
AutoOrShare = Annotated[int | str, BeforeValidator(_auto_or_share), WithJsonSchema(
    {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}, {"type": "string", "pattern": BYTES_PATTERN},
               {"type": "string", "pattern": PERCENT_PATTERN}]})]
Bandwidth = Annotated[int, BeforeValidator(parse_bandwidth), WithJsonSchema(
    {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": BANDWIDTH_PATTERN}]})]
Compute = Annotated[int, BeforeValidator(parse_compute), WithJsonSchema(
    {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": COMPUTE_PATTERN}]})]


# --- dtypes --------------------------------------------------------------------------------------

# torch's name -> (bytes per element, safetensors' code)
DTYPES = {
    "float64": (8, "F64"), "float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16"),
    "float8_e4m3fn": (1, "F8_E4M3"), "float8_e5m2": (1, "F8_E5M2"),
    "int64": (8, "I64"), "int32": (4, "I32"), "int16": (2, "I16"), "int8": (1, "I8"), "uint8": (1, "U8"),
    "bool": (1, "BOOL"),
}
# The short names people type (`--dtype bf16`), beside torch's own.
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
# The dtypes model weights are built in from configs.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(value, *, allowed=WEIGHT_DTYPES) -> str:
    """torch's name of a dtype given as `fp16`, `bf16`, `float32`, `torch.float16` or a torch dtype.

    Raises `DtypeError` for a name that is not one of `allowed`.
    """
    text = torch_dtype_name(value).lower()
    canonical = _DTYPE_ALIASES.get(text, text)
    if canonical not in allowed:
        raise DtypeError(f"unknown dtype {value!r}. Use one of: fp32, fp16, bf16 (or float32, float16, bfloat16)")
    return canonical


def torch_dtype_name(dtype) -> str:
    """torch's name of a torch dtype, without checking it: `torch.float16` -> `float16`."""
    return str(dtype).removeprefix("torch.")


def dtype_size(value) -> int:
    """Bytes per element of a dtype (any name `dtype_name` reads, or a torch dtype).

    >>> dtype_size("bf16"), dtype_size("float8_e4m3fn")
    (2, 1)
    """
    return DTYPES[dtype_name(value, allowed=DTYPES)][0]
