"""The capability table: which strategies each quantization backend can run with, and why not. Data only.

Checked when a policy is resolved against a pipeline, so the refusal comes before
anything is installed, not from inside a forward pass. Each limit says where it was
seen: on this project's CPU test machine (tests/test_quantization.py runs the real
backend), or in the source of the libraries involved where the failure needs an
accelerator to show. Limits that hold only with some library versions name a gate;
whether a gate holds for what is installed is decided in `offloadkit.plans.library_gates`,
since asking needs the libraries (this floor imports none).

Lifted: `model` with `transfer: copy-free | pinned` (and `prefetch`) for torchao, quanto and
bitsandbytes, which move by their inner tensors and side state since `stream` came
(`runtime/packed_weights.py`); `stream` itself, with `from: host` or `from: disk`, for every
backend. Each lifted cell is a case of tests/test_quantization.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .backends import BACKENDS
from .rules import RULES, DiskRule, GroupRule, ModelRule, SequentialRule, SkipRule, StrategyRule


# Gates: the installed libraries a limit depends on (see offloadkit.plans.library_gates).
BNB_8BIT_STUCK = "bnb_8bit_stuck"
GROUP_LEAVES_TORCHAO = "group_leaves_torchao"


@dataclass(frozen=True)
class Limit:
    backend: str
    rule: type[StrategyRule]
    reason: str
    instead: tuple[type[StrategyRule], ...]  # strategies that work; `auto` picks the first
    seen: str  # where the failure was seen
    options: dict = field(default_factory=dict)  # only for rules with one of these option values
    gate: str = ""  # when it applies, if only with some library versions (as people read it)
    gate_check: str = ""  # the name of the check of that gate

    @property
    def what(self) -> str:
        if not self.options:
            return repr(self.rule.name)
        return f"{self.rule.name!r} with " + " or ".join(f"`{k}: {v}`" for k, values in self.options.items()
                                                        for v in values)

    @property
    def alternative(self) -> str:
        """What to use instead, as advice."""
        if self.options:
            return "the default transfer (remove `" + "`, `".join((*self.options, "prefetch")) + "` from the rule)"
        if self.instead == (SkipRule,):
            return (f"'skip' (keep it where it was loaded; `quantization: {{{self.backend}: keep-on-device}}` does "
                    "the same)")
        return " or ".join(repr(s.name) for s in self.instead)

    def covers(self, rule: StrategyRule) -> bool:
        """Whether the limit is about this rule (its strategy and options), whatever is installed."""
        return isinstance(rule, self.rule) and all(getattr(rule, key, None) in values
                                                   for key, values in self.options.items())


_STREAMING_REBUILD = "Accelerate's per-layer streaming re-creates each parameter from its host copy as"
_ON_CPU = "seen on CPU (tests/test_quantization.py)"

LIMITS: tuple[Limit, ...] = (
    # bitsandbytes
    Limit("bnb_8bit", ModelRule, "the installed transformers/bitsandbytes cannot move 8-bit weights with `.to()`",
          (SkipRule,), "diffusers' enable_model_cpu_offload skips such models for this reason",
          gate="transformers < 4.58.0 or bitsandbytes < 0.48.0", gate_check=BNB_8BIT_STUCK),
    Limit("bnb_8bit", GroupRule, "diffusers' group offloading assigns `param.data` from a moved copy, which leaves "
          "the 8-bit scales (`SCB`) and the layer's int8 state (`state.CB`) in host memory", (ModelRule,),
          "diffusers' group_offloading.py and bitsandbytes' Linear8bitLt source (needs an accelerator to show)"),
    Limit("bnb_8bit", SequentialRule, f"{_STREAMING_REBUILD} 8-bit data without its scales (`SCB` is None in "
          "the forward); and the layer keeps a second reference to its int8 data (`state.CB`), so streaming "
          "would free nothing", (ModelRule,), _ON_CPU),
    Limit("bnb_8bit", DiskRule, "the layer computes from its own reference to the int8 data (`state.CB`), which "
          "outlives the memory-mapped file (the process crashed in MatMul8bitLt)", (ModelRule,), _ON_CPU),
    Limit("bnb_4bit", GroupRule, "diffusers' group offloading assigns `param.data`, which leaves the 4-bit "
          "quantization state (`quant_state`) in host memory", (ModelRule,),
          "on an H100 (tests/test_gpu.py): bitsandbytes' dequantize failed with \"invalid argument to "
          "getCurrentStream\""),
    Limit("bnb_4bit", SequentialRule, f"{_STREAMING_REBUILD} a packed tensor without its quantization state "
          "(\"Cannot copy out of meta tensor\")", (ModelRule,), _ON_CPU),
    Limit("bnb_4bit", DiskRule, "the 4-bit quantization state is not stored with the packed weights, so a layer "
          "read back from disk cannot run (\"Cannot copy out of meta tensor\")", (ModelRule,), _ON_CPU),
    # torchao
    Limit("torchao", DiskRule, "torchao tensor subclasses have no storage of their own to write to safetensors "
          "(\"Attempted to access the data pointer on an invalid python storage\")", (ModelRule, GroupRule), _ON_CPU),
    Limit("torchao", GroupRule, "this diffusers' group offloading assigns `param.data`, which leaves torchao "
          "tensors where they were", (ModelRule,), "diffusers' group_offloading.py, which swaps torchao tensors "
          "since its `_swap_torchao_tensor` (needs an accelerator to show)",
          gate="a diffusers whose group offloading has no `_swap_torchao_tensor`",
          gate_check=GROUP_LEAVES_TORCHAO),
    # optimum-quanto
    Limit("quanto", SequentialRule, f"{_STREAMING_REBUILD} a plain tensor, which quanto's tensor subclasses refuse "
          "(\"WeightQBytesTensor.__new__() missing ... arguments\")", (ModelRule,), _ON_CPU),
    Limit("quanto", DiskRule, "quanto's tensor subclasses cannot be written to safetensors and rebuilt per layer",
          (ModelRule,), _ON_CPU),
    Limit("quanto", GroupRule, "diffusers' group offloading assigns `param.data`, which leaves a quanto tensor "
          "subclass where it was (weights on the CPU, inputs on the device)", (ModelRule,),
          "diffusers issue #12610 (needs an accelerator to show; the `.data` behaviour is seen on CPU)"),
    # GGUF
    Limit("gguf", SequentialRule, f"{_STREAMING_REBUILD} a GGUFParameter without its `quant_type` (KeyError: None)",
          (ModelRule, GroupRule), _ON_CPU),
    Limit("gguf", DiskRule, "a GGUFParameter read back from disk has lost its `quant_type` (KeyError: None)",
          (ModelRule, GroupRule), _ON_CPU),
    # a backend offloadkit has no rule of its own for
    Limit("other", SequentialRule, "offloadkit has no rule for this backend, and per-layer streaming re-creates "
          "parameters as plain tensors, which breaks most quantized tensor types", (ModelRule,),
          "by analogy with quanto, GGUF and bitsandbytes 4-bit"),
    Limit("other", DiskRule, "offloadkit has no rule for this backend, and quantized tensor types are rarely "
          "storable in safetensors", (ModelRule,), "by analogy with torchao, quanto and GGUF"),
)


def limit_for_any_version(backend: str, rule: StrategyRule) -> Limit | None:
    """A limit that holds whatever is installed (no version gate), for checks without a pipeline."""
    for limit in LIMITS:
        if limit.backend == backend and not limit.gate_check and limit.covers(rule):
            return limit
    return None


def capability_rows() -> list[tuple[str, dict[str, str]]]:
    """(backend key, {strategy: "yes" | "no" | "yes, except ..."}) for every backend.

    "yes, except" names the limits that hold only with some option or library versions.
    """
    rows = []
    for backend in BACKENDS:
        cells = {}
        for strategy, rule in RULES.items():
            limits = [lim for lim in LIMITS if lim.backend == backend and lim.rule is rule]
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
