"""The devices of this machine: turning `auto`, `cuda`, `cpu` into a `torch.device(type, index)` that exists,
and the small torch helpers every floor shares (where a module is, emptying a device's cache).

`offloadkit.device` is the torch-free vocabulary; this module asks torch.
"""

from __future__ import annotations

from .errors import DeviceError


def detect_accelerator() -> str | None:
    """The accelerator type diffusers would pick (`cuda`, `xpu`, `mps`, ...), or None."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    if torch.cuda.is_available():
        return "cuda"
    return None


def device_type_available(requested) -> bool:
    """Whether this machine has a device of the type `requested` names (`auto`: any accelerator); the index is
    not checked (`resolve_device` does)."""
    import torch

    text = str(requested)
    if text == "auto":
        return detect_accelerator() is not None
    kind = text.partition(":")[0]
    if kind == "cpu":
        return True
    is_available = getattr(getattr(torch, kind, None), "is_available", None)
    return is_available is not None and bool(is_available())


def resolve_device(requested) -> "torch.device":
    """A full device with its index. `auto` means the accelerator and fails clearly without one.

    Example: ``resolve_device("cuda") -> torch.device("cuda:0")``; ``resolve_device("cpu") -> cpu:0``.
    """
    import torch

    text = str(requested)
    if text == "auto":
        kind = detect_accelerator()
        if kind is None:
            raise DeviceError("`device: auto` found no accelerator (no CUDA, XPU or MPS device). "
                              "Pass device='cpu' to offloadkit.apply/plan, or set `device:` in the policy")
        device = torch.device(kind)
    else:
        try:
            device = torch.device(text)
        except (RuntimeError, TypeError) as exc:
            raise DeviceError(f"invalid device {text!r} ({exc}). Use 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise DeviceError(f"invalid device {text!r}: the CPU has only index 0. Use 'cpu'")
        return torch.device("cpu", 0)
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if is_available is None or not is_available():
        raise DeviceError(f"device {text!r} is not available on this machine. Use 'cpu' or an accelerator "
                          "that torch can see")
    index = device.index
    if index is None:
        current = getattr(module, "current_device", None)
        index = current() if current is not None else 0
    count = getattr(module, "device_count", lambda: 1)()
    if index >= count:
        raise DeviceError(f"device {text!r} does not exist: this machine has {count} {device.type} device(s), "
                          f"indices 0 to {count - 1}")
    return torch.device(device.type, index)


def module_device(module):
    """Device of a module's first parameter (or buffer); None for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def same_device(a, b) -> bool:
    """`cpu` and `cpu:0` (and `cuda` and `cuda:0`) name the same place."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def empty_cache(device) -> None:
    import torch

    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def device_memory(device) -> tuple[int | None, int | None]:
    """(free, total) bytes of a CUDA device now; (None, None) for other devices."""
    import torch

    if device.type != "cuda":
        return None, None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def host_ram() -> int | None:
    """Bytes of this machine's RAM, where the platform says; None where it does not."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().total)
