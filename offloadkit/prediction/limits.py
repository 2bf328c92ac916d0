"""A prediction checked against every limit of a machine: device memory, host RAM, pinned host RAM, disk.

Each limit is what the hardware profile says the machine has, less a headroom kept free
(the profile's `device_headroom` / `host_headroom`, or the caller's `headroom`); device
memory also less the runtime's own overhead, which the prediction adds to its peak. The
needed figures are the prediction's: the device peak (weights and working memory), the
most weights held in host RAM and on disk at any forward, and the page-locked host RAM of
pinned transfers and pinned streamed blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..units import format_bytes, share_bytes

DEVICE, HOST_RAM, PINNED, DISK_SPACE = "device memory", "host RAM", "pinned host RAM", "disk"


@dataclass(frozen=True)
class LimitCheck:
    """One limit: what the call needs, what the machine has and keeps free, and whether it fits."""

    limit: str  # DEVICE, HOST_RAM, PINNED or DISK_SPACE
    needed: int
    capacity: int | None  # what the machine has (None: unknown, not checked)
    headroom: int
    detail: str  # what `needed` is made of
    within: str = "a machine with"  # how `capacity` is named in messages ("a budget of" for a budget)

    @property
    def available(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.headroom

    @property
    def checked(self) -> bool:
        return self.capacity is not None

    @property
    def fits(self) -> bool:
        return not self.checked or self.needed <= self.available

    @property
    def over(self) -> int:
        return 0 if self.fits else self.needed - self.available

    def line(self) -> str:
        if self.needed == 0:  # a limit the call does not use (no pinned copies, no disk files)
            return f"{self.limit}: none needed: fits"
        if not self.checked:
            return f"{self.limit}: {format_bytes(self.needed)} needed ({self.detail}); not checked: {self.detail_off}"
        verdict = "fits" if self.fits else f"OVER by {format_bytes(self.over)}"
        keep = f" less {format_bytes(self.headroom)} headroom" if self.headroom else ""
        return (f"{self.limit}: {format_bytes(self.needed)} needed of {format_bytes(self.available)} "
                f"({format_bytes(self.capacity)}{keep}): {verdict}")

    @property
    def detail_off(self) -> str:
        return "the hardware profile gives no `disk_free`" if self.limit == DISK_SPACE else "unknown"

    def message(self) -> str:
        """The limit as an error names it, with its numbers."""
        keep = f" and {format_bytes(self.headroom)} headroom" if self.headroom else ""
        return (f"{self.limit}: {format_bytes(self.needed)} ({self.detail}) on {self.within} "
                f"{format_bytes(self.capacity)}{keep}, over by {format_bytes(self.over)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "available": self.available, "fits": self.fits, "over": self.over}


def check_limits(prediction, hardware, headroom=None) -> tuple[LimitCheck, ...]:
    """Every limit of `hardware` for `prediction`. `headroom` (a size or share) replaces the profile's own."""
    device_keep = share_bytes(headroom or hardware.device_headroom, hardware.device_memory)
    host_keep = share_bytes(headroom or hardware.host_headroom, hardware.host_memory)
    peak = prediction.device_peak_bytes
    checks = [
        LimitCheck(DEVICE, prediction.required_device_bytes, hardware.device_memory, device_keep,
                   f"peak {format_bytes(peak)} + runtime overhead {format_bytes(prediction.runtime_overhead_bytes)}"),
        LimitCheck(HOST_RAM, prediction.host_peak_bytes, hardware.host_memory, host_keep,
                   "weights in host RAM at the call's fullest moment"),
    ]
    # every limit, also those the call does not use (needed 0), so each is said to fit or not
    checks.append(LimitCheck(PINNED, prediction.pinned_host_bytes,
                             share_bytes(hardware.pinned_memory, hardware.host_memory), 0,
                             "pinned transfers and pinned streamed blocks" if prediction.pinned_host_bytes
                             else "no pinned transfers or pinned streamed blocks"))
    checks.append(LimitCheck(DISK_SPACE, prediction.disk_peak_bytes, hardware.disk_free, 0,
                             "weights written to disk files" if prediction.disk_peak_bytes
                             else "no weights written to disk files"))
    return tuple(checks)


def binding(checks) -> tuple[LimitCheck, ...]:
    """The limits a prediction is over."""
    return tuple(c for c in checks if not c.fits)
