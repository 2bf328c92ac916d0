"""The rule classes: one per strategy, with its options and the facts the planner and the runtime read.

A rule is the frozen pydantic object a policy's `components: {NAME: {strategy: ...}}`
entry becomes. It stays that object from loading to install and prediction. Its
class carries what every floor needs to know about the strategy, so no module
outside the strategy's own files compares strategy names:

- `chained`: the component takes part in the offload sequence (onloaded when used,
  offloaded by the next model in the chain or at the end of the call);
- `home`: where its weights live between uses, as the plan shows it (`HOME_DEVICE`:
  the execution device); `managed`: whether offloadkit installs anything on it;
- `offloaded_by` (unchained strategies): what sends its weights back, as the plan shows it;
- `runs_on_device`: whether its forward runs on the execution device;
- `weights_tier`: where the weights sit for the planner's host/disk figures;
- `synthesis_rank`, `fastest()` and `search_forms()`: whether and how synthesis searches it;
- `device_problem()`: what of it cannot run on a device type; `on_device()`: the stand-in that runs there
  instead when the policy was written for another device (a GPU policy in CPU tests).

The installer of a strategy is runtime code, registered by rule class in
`offloadkit.runtime.strategies`; the planner's stream profile likewise in
`offloadkit.prediction.stream_profiles`. A new strategy is one class here
(registered with `@register_rule`), one installer file, and, where it streams
weights, one profile.

No torch import: validating a policy stays lightweight.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..errors import quoted
from ..units import BYTES_PATTERN, PERCENT_PATTERN, Share, parse_bytes, parse_share

HOME_DEVICE = "device"  # `home` of a rule whose weights stay on the execution device
HOST, DISK = "host", "disk"  # the tiers weights are held in off the device (`weights_tier`)

# Precision keys are left out of a plan's options when unset, so plans of policies without them do not change.
PRECISION_KEYS = ("storage_dtype", "compute_dtype", "quantize", "quantize_with")


class StrategyRule(BaseModel):
    """Options of one component's strategy. Subclasses add a `strategy: Literal["name"]` tag and register."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""  # set by register_rule from the `strategy` tag
    chained: ClassVar[bool] = False
    managed: ClassVar[bool] = True
    home: ClassVar[str] = "cpu"
    runs_on_device: ClassVar[bool] = True
    weights_tier: ClassVar[str | None] = HOST  # HOST, DISK, or None (on the device, or not managed)
    synthesis_rank: ClassVar[int | None] = None  # searched by synthesis in this order (cheapest to run first)
    block_layout: ClassVar[bool] = False  # the plan lays its blocks out (`plans.stream_layout`)

    @classmethod
    def default(cls) -> "StrategyRule":
        """The rule with every option at its default."""
        return cls(strategy=cls.name)

    @classmethod
    def fastest(cls, device_type: str) -> "StrategyRule":
        """The fastest form of this strategy on a device type (default: the defaults)."""
        return cls.default()

    @classmethod
    def search_forms(cls, device_type: str) -> list["StrategyRule"]:
        """The forms synthesis tries, fastest first (default: `fastest()` alone)."""
        return [cls.fastest(device_type)]

    def with_defaults(self, *keys: str) -> "StrategyRule":
        """The same rule with these options (those it has) back at their defaults."""
        fields = type(self).model_fields
        return self.model_copy(update={k: fields[k].get_default(call_default_factory=True)
                                       for k in keys if k in fields})

    def set_options(self) -> dict:
        """The options the rule was written with (not those left at their defaults), `strategy` first."""
        return {"strategy": self.name, **self.model_dump(exclude_unset=True, exclude={"strategy"}, by_alias=True)}

    def options(self) -> dict:
        """The options as a plan shows them (JSON values; precision keys only when set)."""
        return {k: v for k, v in self.model_dump(exclude={"strategy"}, mode="json", by_alias=True).items()
                if not (k in PRECISION_KEYS and v in (None, "auto"))}

    @property
    def offloaded_by(self) -> str | None:
        """For unchained strategies: what sends the weights back, as the plan shows it."""
        return None

    # How the planner times this rule's whole-model moves.
    @property
    def onload_pinned(self) -> bool:
        return False

    @property
    def host_copy_while_on_device(self) -> bool:
        """Whether host RAM still holds the weights while they are on the device."""
        return False

    @property
    def offload_copies_back(self) -> bool:
        """Whether an offload copies the weights back (without a kept host copy, it must)."""
        return not self.host_copy_while_on_device

    @property
    def precision_change(self) -> bool:
        """Whether the rule changes how the weights are stored when the policy is applied."""
        return False

    @property
    def uploads_ahead(self) -> bool:
        """Whether a chained component's upload starts while the model before it in the chain runs."""
        return False

    @property
    def pins_host_copy(self) -> bool:
        """Whether the whole component's host copy is page-locked while the policy is applied (on CUDA)."""
        return self.onload_pinned

    def device_problem(self, device_type: str) -> str | None:
        """Why this rule cannot run on that kind of device, or None."""
        return None

    def on_device(self, device_type: str) -> tuple["StrategyRule", str | None]:
        """The rule as it runs on a device type it was not written for: `(self, None)` when it runs as written,
        else `(stand_in, what changed)`, the nearest rule `device_problem` accepts there. Same outputs, other
        timings: what lets a GPU policy run in CPU tests. A strategy with a `device_problem` overrides it."""
        return self, None


# --- registration ------------------------------------------------------------------------------

RULES: dict[str, type[StrategyRule]] = {}  # name -> rule class, in registration order


def register_rule(cls: type[StrategyRule]) -> type[StrategyRule]:
    """Register a rule class under the name of its `strategy` tag (unique, lower-case)."""
    field = cls.model_fields.get("strategy")
    tags = typing.get_args(field.annotation) if field is not None else ()
    if len(tags) != 1 or not isinstance(tags[0], str):
        raise TypeError(f"{cls.__name__} needs a field `strategy: Literal['name']` with one name")
    name = tags[0]
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"strategy name {name!r} of {cls.__name__} must be lower-case letters, digits, '-' or '_'")
    if name in RULES:
        raise ValueError(f"strategy {name!r} is registered twice ({RULES[name].__name__} and {cls.__name__})")
    cls.name = name
    RULES[name] = cls
    return cls


def strategy_names() -> list[str]:
    """Every strategy name, sorted (as error messages and the JSON Schema list them)."""
    return sorted(RULES)


# --- precision, which most rules may declare -------------------------------------------------------

class PrecisionRule(StrategyRule):
    """A strategy rule that may also change how the component's weights are stored (applied in place)."""

    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"] | None = Field(
        None,
        description="Store the weights of the component's layers in this dtype and cast each layer up to "
        "`compute_dtype` only while it runs (diffusers' layerwise casting): fewer bytes stored and moved. "
        "Norms, embeddings and the layers the model keeps in float32 stay as they are. Changes the weights "
        "in place; `remove()` does not undo it.",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="With `storage_dtype`: the dtype layers run in. Default: the component's dtype.")
    quantize: Literal["int8"] | None = Field(
        None,
        description="Quantize the weights of every Linear layer when the policy is applied (`int8`: weight-only "
        "int8 with one scale per output row), so no quantized checkpoint is needed. Changes the weights in "
        "place; `remove()` does not undo it.",
    )
    quantize_with: Literal["auto", "torchao", "quanto"] = Field(
        "auto",
        description="Backend for `quantize`: `auto` picks torchao, or optimum-quanto where torchao is not "
        "installed or cannot serve the strategy.",
    )

    @model_validator(mode="after")
    def _one_precision_change(self):
        if self.storage_dtype is not None and self.quantize is not None:
            raise ValueError("`storage_dtype` and `quantize` cannot both be set: a quantized layer has no float "
                             "storage to cast. Keep one")
        if self.compute_dtype is not None and self.storage_dtype is None:
            raise ValueError("`compute_dtype` is the dtype layers are cast up to from `storage_dtype`. Set "
                             "`storage_dtype` too, or remove `compute_dtype`")
        if self.quantize_with != "auto" and self.quantize is None:
            raise ValueError("`quantize_with` picks the backend of `quantize`. Set `quantize: int8` too, or "
                             "remove `quantize_with`")
        return self

    @property
    def precision_change(self) -> bool:
        return bool(self.storage_dtype or self.quantize)

    def without_precision(self) -> "PrecisionRule":
        """The same rule with no precision change."""
        return self.with_defaults(*PRECISION_KEYS)


# --- the strategies ------------------------------------------------------------------------------

@register_rule
class ModelRule(PrecisionRule):
    """Offload the whole component to host RAM between uses (diffusers' model offload)."""

    strategy: Literal["model"]
    keep_on_device: bool = Field(
        False,
        description="Once onloaded, stay on the device across calls: neither the next model in the chain nor "
        "the end of a call offloads it (until the policy is removed). For servers calling the same pipeline "
        "again and again.",
    )
    transfer: Literal["standard", "copy-free", "pinned"] = Field(
        "standard",
        description="`standard`: module.to() both ways, as diffusers. `copy-free`: offload drops the device "
        "copies instead of copying unchanged weights back. `pinned`: copy-free with a page-locked host copy "
        "and non-blocking onloads (accelerators only).",
    )
    prefetch: bool = Field(
        False,
        description="Start this model's upload while the model before it in `sequence` computes (on a side "
        "stream on CUDA, so the copy overlaps that work; at once elsewhere). Both are on the device meanwhile. "
        "Needs `transfer: pinned` (or `copy-free`, which cannot overlap on CUDA).",
    )

    chained: ClassVar[bool] = True
    synthesis_rank: ClassVar[int | None] = 1

    @model_validator(mode="after")
    def _prefetch_copies_from_the_host_copy(self):
        if self.prefetch and self.transfer == "standard":
            raise ValueError("`prefetch: true` needs `transfer: pinned` (the upload is copied from a kept host copy "
                             "on a side stream; pinned memory is what lets it overlap). Add `transfer: pinned`, or "
                             "'copy-free' on the CPU")
        return self

    @classmethod
    def fastest(cls, device_type: str) -> "ModelRule":
        return cls(strategy=cls.name, transfer="copy-free" if device_type == "cpu" else "pinned")

    @classmethod
    def search_forms(cls, device_type: str) -> list["ModelRule"]:
        # pinned where it fits the machine's pinned RAM, else copy-free from pageable memory
        forms = [cls.fastest(device_type)]
        return forms if device_type == "cpu" else forms + [cls(strategy=cls.name, transfer="copy-free")]

    @property
    def onload_pinned(self) -> bool:
        return self.transfer == "pinned"

    @property
    def uploads_ahead(self) -> bool:
        return self.prefetch

    @property
    def host_copy_while_on_device(self) -> bool:
        return self.transfer != "standard"

    def device_problem(self, device_type: str) -> str | None:
        if self.transfer == "pinned" and device_type == "cpu":
            return "`transfer: pinned` needs an accelerator (pinned memory speeds up host-to-device copies); " \
                   "the device is the CPU. Use 'copy-free' or 'standard'"
        return None

    def on_device(self, device_type: str) -> tuple["ModelRule", str | None]:
        if self.device_problem(device_type) is None:
            return self, None
        # copy-free is pinned without the page-locked memory: the same kept host copy, in pageable RAM
        return self.model_copy(update={"transfer": "copy-free"}), "`transfer: copy-free` in place of 'pinned'"


@register_rule
class GroupRule(PrecisionRule):
    """Offload groups of blocks (or leaf modules) with diffusers' group offloading."""

    strategy: Literal["group"]
    offload_type: Literal["block_level", "leaf_level"] = Field(
        "block_level",
        description="`block_level`: groups of the model's top-level ModuleList/Sequential blocks; "
        "`leaf_level`: every leaf module on its own (lowest memory).",
    )
    num_blocks_per_group: int = Field(1, ge=1, description="Blocks per group, for `block_level`.")
    use_stream: bool = Field(False, description="Prefetch the next group on a side stream (accelerators only).")
    record_stream: bool = Field(False, description="With `use_stream`: mark tensors for the stream "
                                "(faster, a little more memory).")
    low_cpu_mem_usage: bool = Field(False, description="With `use_stream`: pin on the fly instead of keeping "
                                    "a pinned copy (less host RAM, slower).")
    non_blocking: bool = Field(False, description="Non-blocking host-to-device copies.")
    block_modules: list[str] | None = Field(
        None,
        description="Submodules to treat as blocks, for models whose layers are nested (text encoders): "
        "names of child modules, one per level, as diffusers matches them: the groups are the lists of blocks "
        "found among the children of the modules named (T5: `[encoder]`; CLIP: `[encoder]` or "
        "`[text_model, encoder]`). Checked against the model at apply. Default: the model's own setting.",
    )

    synthesis_rank: ClassVar[int | None] = 3

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        if self.record_stream and not self.use_stream:
            raise ValueError("`record_stream: true` needs `use_stream: true`. Set both, or neither")
        return self

    @classmethod
    def fastest(cls, device_type: str) -> "GroupRule":
        stream = {"use_stream": True, "record_stream": True} if device_type == "cuda" else {}
        return cls(strategy=cls.name, offload_type="block_level", num_blocks_per_group=1, **stream)

    @property
    def offloaded_by(self) -> str | None:
        return "after each group"

    @property
    def pins_host_copy(self) -> bool:
        return self.use_stream and not self.low_cpu_mem_usage  # diffusers keeps a pinned copy of every group

    def device_problem(self, device_type: str) -> str | None:
        if self.use_stream and device_type == "cpu":
            return "`use_stream: true` needs an accelerator with streams; the device is the CPU. Set it to false"
        return None

    def on_device(self, device_type: str) -> tuple["GroupRule", str | None]:
        if self.device_problem(device_type) is None:
            return self, None
        # the stream options all serve the side stream: without it the groups load when used, in order
        off = [k for k in ("use_stream", "record_stream", "low_cpu_mem_usage") if getattr(self, k)]
        return (self.model_copy(update=dict.fromkeys(off, False)),
                "no side stream (" + ", ".join(f"`{k}: false`" for k in off) + ")")


@register_rule
class SequentialRule(PrecisionRule):
    """Stream each layer's weights to the device for its forward only."""

    strategy: Literal["sequential"]
    offload_buffers: Literal["auto"] | bool = Field(
        "auto",
        description="Offload buffers too. `auto`: as diffusers (when the model has parameters of its own).",
    )

    home: ClassVar[str] = "meta (host RAM)"
    synthesis_rank: ClassVar[int | None] = 4

    @property
    def offloaded_by(self) -> str | None:
        return "after each layer"


@register_rule
class DiskRule(PrecisionRule):
    """Stream each layer's weights from a memory-mapped safetensors file to the device."""

    strategy: Literal["disk"]
    folder: str | None = Field(
        None,
        description="Where the files go (a subfolder per component and weights fingerprint is made in it). "
        "Default: a new temporary folder. Files are deleted on remove().",
    )
    offload_buffers: Literal["auto"] | bool = Field(
        "auto", description="Offload buffers too. `auto`: when the model has parameters of its own.")
    granularity: Literal["layer", "block"] = Field(
        "layer",
        description="`layer`: each module's weights for its own forward (least memory). `block`: a whole "
        "block (an element of the model's top-level ModuleLists, or another top-level child) at a time: "
        "more memory, far less hook overhead.",
    )

    home: ClassVar[str] = "meta (disk)"
    weights_tier: ClassVar[str | None] = DISK
    synthesis_rank: ClassVar[int | None] = 5

    @classmethod
    def fastest(cls, device_type: str) -> "DiskRule":
        return cls(strategy=cls.name, granularity="block")

    @model_validator(mode="after")
    def _block_streaming_keeps_buffers(self):
        if self.granularity == "block" and self.offload_buffers is True:
            raise ValueError("`offload_buffers: true` does not work with `granularity: block` (buffers stay on the "
                             "device there). Use 'auto' or false, or `granularity: layer`")
        return self

    @property
    def offloaded_by(self) -> str | None:
        return "after each block" if self.granularity == "block" else "after each layer"


def _check_resident(value):
    """`auto`, a block count, a percentage of the blocks, or a size of blocks kept on the device."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        parse_share(value)
        return value
    if isinstance(value, str):
        try:
            parse_bytes(value)
            return value
        except ValueError:
            pass
    raise ValueError(f"cannot read `resident: {quoted(value)}`. Write `auto`, a number of blocks (e.g. 8), a share "
                     "of them (e.g. '40%') or a size of them (e.g. '6GiB')")


@register_rule
class StreamRule(PrecisionRule):
    """Keep as many of the model's blocks on the device as fit, and stream the others ahead of compute."""

    strategy: Literal["stream"]
    blocks: list[str] | None = Field(
        None, min_length=1,
        description="Dotted paths of the ModuleLists whose elements are the blocks to stream (or of single "
        "modules, each a block), e.g. `[transformer_blocks, single_transformer_blocks]`. Default: the model's "
        "top-level ModuleLists, as diffusers' group offloading finds them. Everything else of the model is "
        "on the device while it runs.",
    )
    resident: Annotated[int | str, BeforeValidator(_check_resident)] = Field(
        "auto",
        description="Blocks kept on the device for the whole call: `auto` (as many as fit the policy's "
        "`budget`, or the device's free memory at apply less `headroom`), a count (`8`), a share of the "
        "blocks (`40%`) or a size of them (`6GiB`).",
        json_schema_extra={"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 0},
                                     {"type": "string", "pattern": PERCENT_PATTERN},
                                     {"type": "string", "pattern": BYTES_PATTERN}]},
    )
    placement: Literal["spread", "first", "last"] = Field(
        "spread",
        description="Which blocks stay resident: `spread` evenly through the model (each resident block's "
        "compute gives the copies of the next streamed ones time), `first` or `last`.",
    )
    prefetch: int = Field(1, ge=1, description="Streamed blocks copied ahead of the one computing (at least "
                          "1). The device holds this many plus one in a fixed pool of buffers.")
    keep_on_device: bool = Field(
        False, description="Keep the rest of the model, its resident blocks and the buffer pool on the device "
        "across calls (only remove() offloads them), instead of offloading them like a `model` component.")
    source: Literal["host", "disk"] = Field(
        "host", alias="from",
        description="Where streamed blocks are copied from: `host` RAM (pinned where the platform has it, "
        "up to the policy's `pinned_memory`), or `disk`: memory-mapped files, for machines short of RAM.")
    folder: str | None = Field(
        None, description="With `from: disk`: where the files go (default: a temporary folder). Deleted on "
        "remove().")
    headroom: Share = Field(
        "15%", description="With `resident: auto` and no `budget`: device memory kept free for activations "
        "and other models, a size or a share of the device's memory.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    chained: ClassVar[bool] = True
    block_layout: ClassVar[bool] = True
    synthesis_rank: ClassVar[int | None] = 2

    @classmethod
    def search_forms(cls, device_type: str) -> list["StreamRule"]:
        # from host RAM first; from disk for a model that host RAM cannot hold beside the others
        return [cls.fastest(device_type), cls.model_validate({"strategy": cls.name, "from": "disk"})]

    @model_validator(mode="after")
    def _folder_is_for_disk(self):
        if self.folder is not None and self.source != "disk":
            raise ValueError("`folder` is where `from: disk` puts its files. Add `from: disk`, or remove `folder`")
        return self

    @property
    def weights_tier(self) -> str | None:
        return DISK if self.source == "disk" else HOST

    @property
    def host_copy_while_on_device(self) -> bool:
        return True

    @property
    def offloaded_by(self) -> str | None:
        return None


@register_rule
class ResidentRule(PrecisionRule):
    """Keep the component on the execution device for as long as the policy is applied."""

    strategy: Literal["resident"]

    home: ClassVar[str] = HOME_DEVICE
    weights_tier: ClassVar[str | None] = None
    synthesis_rank: ClassVar[int | None] = 0


@register_rule
class SkipRule(StrategyRule):
    """Leave the component where it is and install nothing on it."""

    strategy: Literal["skip"]

    managed: ClassVar[bool] = False
    home: ClassVar[str] = "unchanged"
    runs_on_device: ClassVar[bool] = False
    weights_tier: ClassVar[str | None] = None

