"""The capability table: which strategies each quantization backend can run with, and why not.

Checked when a policy is resolved against a pipeline, so the refusal comes before
anything is installed, not from inside a forward pass. Each limit says where it was
seen: on this project's CPU test machine (tests/test_quantization.py runs the real
backend), or in the source of the libraries involved where the failure needs an
accelerator to show. Limits that depend on library versions carry a gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .quantization import BACKENDS

STRATEGY_ORDER = ("model", "group", "sequential", "disk", "resident", "skip")
_DATA_SWAP = ("copy-free", "pinned")  # `model` transfers that swap `param.data` instead of calling `.to()`


def _always() -> bool:
    return True


def bnb_8bit_movable() -> bool:
    """Whether the installed libraries can move bitsandbytes 8-bit weights (diffusers' own test)."""
    try:
        from diffusers.utils import is_bitsandbytes_version, is_transformers_version
    except ImportError:
        return True
    try:
        return not (is_transformers_version("<", "4.58.0") or is_bitsandbytes_version("<", "0.48.0"))
    except Exception:  # bitsandbytes not installed: nothing of it to move
        return True


def _bnb_8bit_stuck() -> bool:
    return not bnb_8bit_movable()


def group_offloading_swaps_torchao() -> bool:
    """Whether the installed diffusers' group offloading moves torchao tensors (by `swap_tensors`)."""
    try:
        from diffusers.hooks import group_offloading
    except ImportError:
        return True
    return hasattr(group_offloading, "_swap_torchao_tensor")


def _group_leaves_torchao() -> bool:
    return not group_offloading_swaps_torchao()


@dataclass(frozen=True)
class Limit:
    backend: str
    strategy: str
    reason: str
    instead: tuple[str, ...]  # strategies that work; `auto` picks the first
    seen: str  # where the failure was seen
    options: dict = field(default_factory=dict)  # only for rules with one of these option values
    gate: str = ""  # when it applies, if only with some library versions
    applies: Callable[[], bool] = _always

    @property
    def what(self) -> str:
        if not self.options:
            return repr(self.strategy)
        return f"{self.strategy!r} with " + " or ".join(f"`{k}: {v}`" for k, values in self.options.items()
                                                       for v in values)

    @property
    def alternative(self) -> str:
        """What to use instead, as advice."""
        if self.options:
            return "the default transfer (remove `" + "`, `".join((*self.options, "prefetch")) + "` from the rule)"
        if self.instead == ("skip",):
            return (f"'skip' (keep it where it was loaded; `quantization: {{{self.backend}: keep-on-device}}` does "
                    "the same)")
        return " or ".join(repr(s) for s in self.instead)

    def covers(self, strategy: str, options: dict) -> bool:
        """Whether the limit is about this strategy with these options (whatever is installed)."""
        return strategy == self.strategy and all(options.get(key) in values for key, values in self.options.items())

    def matches(self, strategy: str, options: dict) -> bool:
        return self.covers(strategy, options) and self.applies()


_STREAMING_REBUILD = "Accelerate's per-layer streaming re-creates each parameter from its host copy as"
_ON_CPU = "seen on CPU (tests/test_quantization.py)"

LIMITS: tuple[Limit, ...] = (
    # bitsandbytes
    Limit("bnb_8bit", "model", "the installed transformers/bitsandbytes cannot move 8-bit weights with `.to()`",
          ("skip",), "diffusers' enable_model_cpu_offload skips such models for this reason",
          gate="transformers < 4.58.0 or bitsandbytes < 0.48.0", applies=_bnb_8bit_stuck),
    Limit("bnb_8bit", "group", "diffusers' group offloading assigns `param.data` from a moved copy, which leaves "
          "the 8-bit scales (`SCB`) and the layer's int8 state (`state.CB`) in host memory", ("model",),
          "diffusers' group_offloading.py and bitsandbytes' Linear8bitLt source (needs an accelerator to show)"),
    Limit("bnb_8bit", "model", "bitsandbytes keeps the 8-bit scales (`SCB`) as an attribute of the weight, which "
          "swapping `param.data` leaves in host memory", ("model",), "bitsandbytes' Int8Params source (needs an "
          "accelerator to show)", options={"transfer": _DATA_SWAP}),
    Limit("bnb_8bit", "sequential", f"{_STREAMING_REBUILD} 8-bit data without its scales (`SCB` is None in "
          "the forward); and the layer keeps a second reference to its int8 data (`state.CB`), so streaming "
          "would free nothing", ("model",), _ON_CPU),
    Limit("bnb_8bit", "disk", "the layer computes from its own reference to the int8 data (`state.CB`), which "
          "outlives the memory-mapped file (the process crashed in MatMul8bitLt)", ("model",), _ON_CPU),
    Limit("bnb_4bit", "model", "bitsandbytes keeps the 4-bit quantization state (`quant_state`) as an attribute "
          "of the weight, which swapping `param.data` leaves in host memory", ("model",),
          "bitsandbytes' Params4bit source (needs an accelerator to show)", options={"transfer": _DATA_SWAP}),
    Limit("bnb_4bit", "group", "diffusers' group offloading assigns `param.data`, which leaves the 4-bit "
          "quantization state (`quant_state`) in host memory", ("model",),
          "on an H100 (tests/test_gpu.py): bitsandbytes' dequantize failed with \"invalid argument to "
          "getCurrentStream\""),
    Limit("bnb_4bit", "sequential", f"{_STREAMING_REBUILD} a packed tensor without its quantization state "
          "(\"Cannot copy out of meta tensor\")", ("model",), _ON_CPU),
    Limit("bnb_4bit", "disk", "the 4-bit quantization state is not stored with the packed weights, so a layer "
          "read back from disk cannot run (\"Cannot copy out of meta tensor\")", ("model",), _ON_CPU),
    # torchao
    Limit("torchao", "disk", "torchao tensor subclasses have no storage of their own to write to safetensors "
          "(\"Attempted to access the data pointer on an invalid python storage\")", ("model", "group"), _ON_CPU),
    Limit("torchao", "model", "assigning `param.data` leaves a torchao tensor subclass unchanged, so a "
          "data-swapping transfer would never move its inner tensors (`qdata`, `scale`)", ("model", "group"),
          "seen on CPU (tests/test_quantization.py); diffusers' group offloading swaps torchao tensors with "
          "`torch.utils.swap_tensors` for this reason", options={"transfer": _DATA_SWAP}),
    Limit("torchao", "group", "this diffusers' group offloading assigns `param.data`, which leaves torchao "
          "tensors where they were", ("model",), "diffusers' group_offloading.py, which swaps torchao tensors "
          "since its `_swap_torchao_tensor` (needs an accelerator to show)",
          gate="a diffusers whose group offloading has no `_swap_torchao_tensor`", applies=_group_leaves_torchao),
    # optimum-quanto
    Limit("quanto", "sequential", f"{_STREAMING_REBUILD} a plain tensor, which quanto's tensor subclasses refuse "
          "(\"WeightQBytesTensor.__new__() missing ... arguments\")", ("model",), _ON_CPU),
    Limit("quanto", "disk", "quanto's tensor subclasses cannot be written to safetensors and rebuilt per layer",
          ("model",), _ON_CPU),
    Limit("quanto", "group", "diffusers' group offloading assigns `param.data`, which leaves a quanto tensor "
          "subclass where it was (weights on the CPU, inputs on the device)", ("model",),
          "diffusers issue #12610 (needs an accelerator to show; the `.data` behaviour is seen on CPU)"),
    Limit("quanto", "model", "assigning `param.data` leaves a quanto tensor subclass unchanged, so a "
          "data-swapping transfer would never move its inner tensors", ("model",),
          "seen on CPU (tests/test_quantization.py)", options={"transfer": _DATA_SWAP}),
    # GGUF
    Limit("gguf", "sequential", f"{_STREAMING_REBUILD} a GGUFParameter without its `quant_type` (KeyError: None)",
          ("model", "group"), _ON_CPU),
    Limit("gguf", "disk", "a GGUFParameter read back from disk has lost its `quant_type` (KeyError: None)",
          ("model", "group"), _ON_CPU),
    # a backend offloadkit has no rule of its own for
    Limit("other", "sequential", "offloadkit has no rule for this backend, and per-layer streaming re-creates "
          "parameters as plain tensors, which breaks most quantized tensor types", ("model",),
          "by analogy with quanto, GGUF and bitsandbytes 4-bit"),
    Limit("other", "disk", "offloadkit has no rule for this backend, and quantized tensor types are rarely "
          "storable in safetensors", ("model",), "by analogy with torchao, quanto and GGUF"),
)


def limit_for(backend: str | None, strategy: str, options: dict) -> Limit | None:
    """The limit that forbids `strategy` (with `options`) for `backend`, or None when it may run."""
    if backend is None:
        return None
    for limit in LIMITS:
        if limit.backend == backend and limit.matches(strategy, options):
            return limit
    return None


def limit_for_any_version(backend: str, strategy: str, options: dict) -> Limit | None:
    """A limit that holds whatever is installed (no version gate), for checks without a pipeline."""
    for limit in LIMITS:
        if limit.backend == backend and not limit.gate and limit.covers(strategy, options):
            return limit
    return None


def capability_rows() -> list[tuple[str, dict[str, str]]]:
    """(backend key, {strategy: "yes" | "no" | "yes, except ..."}) for every backend.

    "yes, except" names the limits that hold only with some option or library versions.
    """
    rows = []
    for backend in BACKENDS:
        cells = {}
        for strategy in STRATEGY_ORDER:
            limits = [lim for lim in LIMITS if lim.backend == backend and lim.strategy == strategy]
            whole = [lim for lim in limits if not lim.options and not lim.gate]
            if whole:
                cells[strategy] = "no"
            elif limits:
                cells[strategy] = "yes, except " + "; ".join(
                    (f"{', '.join(f'{k}: {v}' for k, vs in lim.options.items() for v in vs)}" if lim.options
                     else f"with {lim.gate}") for lim in limits)
            else:
                cells[strategy] = "yes"
        rows.append((backend, cells))
    return rows


def format_capabilities() -> str:
    """The table as text (what `offloadkit list` prints): per backend what is refused, then every limit."""
    lines = []
    for key, cells in capability_rows():
        refused = [s for s, cell in cells.items() if cell == "no"]
        partly = [f"{s} ({cell})" for s, cell in cells.items() if cell.startswith("yes, except")]
        text = f"{BACKENDS[key]}: refused " + (", ".join(refused) or "nothing")
        lines.append(f"{key:<22} {text}" + (f"; {'; '.join(partly)}" if partly else ""))
    lines += ["", "limits:"]
    for lim in LIMITS:
        gate = f" [only with {lim.gate}]" if lim.gate else ""
        lines.append(f"- {BACKENDS[lim.backend]} x {lim.what}{gate}: {lim.reason}. Instead: {lim.alternative}. "
                     f"Source: {lim.seen}.")
    return "\n".join(lines)
