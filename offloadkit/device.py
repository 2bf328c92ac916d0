"""Device names: the one vocabulary of device types, and the typed value a device string is parsed into. No torch.

A device is written as a string at the entry points (`device:` in a policy,
`apply(device=...)`, `--device`) and parsed once into a `Device`, which is a `str`
(so plans print and compare as before) that knows its `type` and `index`.
What exists on this machine is `offloadkit.accelerator`'s business.

Example::

    Device.parse("cuda")        # Device('cuda:0'): .type 'cuda', .index 0
    Device.parse("auto").is_auto
"""

from __future__ import annotations

from .errors import DeviceError

# The device types torch names; `cpu` first. A policy may name any of them with an index.
DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "npu", "mlu", "hpu", "musa", "privateuseone")
# `auto` or a device type with an optional index, checked without torch (the policy schema uses it).
DEVICE_PATTERN = rf"^(auto|{'|'.join(DEVICE_TYPES)})(:[0-9]+)?$"
AUTO = "auto"


class Device(str):
    """A device with its index (`cuda:0`, `cpu:0`), or `auto` (the accelerator, decided where the plan runs)."""

    __slots__ = ()

    @classmethod
    def parse(cls, text) -> "Device":
        """`cuda` -> `cuda:0`; `auto` stays `auto`; anything else is a `DeviceError`. Does not look at this machine."""
        if isinstance(text, cls):
            return text
        text = str(text)
        if text == AUTO:
            return cls(text)
        kind, colon, index = text.partition(":")
        if kind not in DEVICE_TYPES or (colon and not index.isdigit()):
            raise DeviceError(f"invalid device {text!r}. Use 'auto', 'cpu', or an accelerator such as 'cuda' or "
                              "'cuda:1'")
        return cls(f"{kind}:{int(index or 0)}")

    @property
    def is_auto(self) -> bool:
        return str.__eq__(self, AUTO)

    @property
    def type(self) -> str | None:
        """`cuda`, `cpu`, ...; None for `auto`."""
        return None if self.is_auto else self.partition(":")[0]

    @property
    def index(self) -> int | None:
        return None if self.is_auto else int(self.partition(":")[2])

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"


def device_label(text: str) -> str:
    """A device string with its index, without checking this machine (for plans of another machine).

    ``device_label("cuda") -> "cuda:0"``; ``auto`` stays ``auto``.
    """
    return Device.parse(text)
