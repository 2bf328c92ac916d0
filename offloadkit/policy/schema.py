"""The policy's pydantic models: the single source of truth for validation and the JSON Schema.

No torch import here: `offloadkit validate` and `offloadkit schema` run in
lightweight CI jobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator

from ..device import DEVICE_PATTERN
from ..errors import quoted
from ..units import AutoOrShare, Size
from .capabilities import limit_for_any_version
from .rules import PRECISION_KEYS, RULES, StrategyRule, strategy_names

# Relative: resolved against wherever the file is read from (the repository's `schemas/`, the wheel's
# `offloadkit/policy/schemas/`, a copy written by `offloadkit schema -o`). offloadkit owns no web domain to host it.
SCHEMA_ID = "policy.schema.json"
SCHEMA_FILE = "policy.schema.json"
SCHEMA_PACKAGE = "offloadkit.policy.schemas"  # `schemas/` of the repository, shipped in the wheel under this name
# Parents in one `extends` chain beyond the policy itself (`loading` enforces it): deep enough for layered
# policies, and a bound on the files read for a chain of 1,000 or one generated without end.
MAX_EXTENDS = 16

QuantAction = Literal["auto", "keep-on-device", "offload", "refuse"]

ComponentRule = Annotated[
    Union[tuple(RULES[name] for name in strategy_names())],
    Field(discriminator="strategy"),
]


QuantSetting = Union[QuantAction, ComponentRule]

_QUANT_HELP = ("`auto`, `keep-on-device`, `offload`, `refuse`, or a strategy rule (e.g. `{strategy: group}`) for "
               "every component quantized with ")


class QuantizationRules(BaseModel):
    """What happens to components whose weights are quantized, per backend.

    - `keep-on-device`: leave the component where it was loaded (bitsandbytes loads
      straight to the device); no hook, never moved.
    - `offload`: the rule every other model gets (`components.*`, else `model`).
    - `refuse`: applying the policy to a pipeline with such a component is an error.
    - a strategy rule (`{strategy: group, offload_type: leaf_level}`): use it for them.
    - `auto`: `offload`, except that bitsandbytes 8-bit stays on the device where the
      installed transformers/bitsandbytes cannot move it (diffusers' rule), and that a
      strategy the backend cannot run with is replaced by one it can (the plan says so).

    A rule under `components` for a component overrides all of these. A strategy a
    backend cannot run with is a validation error (see `offloadkit list --quantization`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bnb_8bit: QuantSetting = Field("auto", description=_QUANT_HELP + "bitsandbytes 8-bit (LLM.int8).")
    bnb_4bit: QuantSetting = Field("auto", description=_QUANT_HELP + "bitsandbytes 4-bit (NF4/FP4).")
    torchao: QuantSetting | None = Field(None, description=_QUANT_HELP + "torchao. Unset: as `other`.")
    quanto: QuantSetting | None = Field(None, description=_QUANT_HELP + "optimum-quanto. Unset: as `other`.")
    gguf: QuantSetting | None = Field(None, description=_QUANT_HELP + "GGUF (diffusers' GGUF loader). Unset: as "
                                      "`other`.")
    layerwise_casting: QuantSetting = Field(
        "auto", description=_QUANT_HELP + "diffusers' layerwise casting (weights stored in a lower-precision "
        "dtype, e.g. by `enable_layerwise_casting`).")
    other: QuantSetting = Field(
        "auto",
        description=_QUANT_HELP + "any backend without a key of its own above (and torchao, quanto, GGUF while "
        "theirs are unset).",
    )

    @field_validator("bnb_8bit", "bnb_4bit", "torchao", "quanto", "gguf", "layerwise_casting", mode="after")
    @classmethod
    def _rule_the_backend_can_run(cls, value, info):
        """A rule under a backend's key is for models of that backend: what can never work is refused here."""
        if not isinstance(value, StrategyRule):
            return value
        changes = [k for k in ("storage_dtype", "quantize") if getattr(value, k, None)]
        if changes:
            raise ValueError(f"`{changes[0]}` changes float weights; the models this key is for are already "
                             f"quantized. Remove `{changes[0]}` here")
        limit = limit_for_any_version(info.field_name, value)
        if limit is not None:
            raise ValueError(f"{info.field_name} models cannot use strategy {limit.what}: {limit.reason}. Use "
                             f"{limit.alternative} (source: {limit.seen})")
        return value

    def setting(self, backend: str) -> tuple[str, object]:
        """(the key that decides, its value) for a backend key of `offloadkit.policy.backends.BACKENDS`."""
        value = getattr(self, backend, None) if backend in type(self).model_fields else None
        if value is None:
            return "other", self.other
        return backend, value


def _exactly_one(value):
    # YAML's `true` and `1.0` would pass as 1 in pydantic's lax mode; the JSON Schema says const 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"unsupported version {quoted(value)}. This offloadkit reads `version: 1`")
    return value


VersionOne = Annotated[Literal[1], BeforeValidator(_exactly_one)]  # the format version of policies and profiles

class Budget(BaseModel):
    """A cap on the bytes of weights resident on the device, checked at every onload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_memory: Size = Field(
        description="Largest total of component weights on the device, e.g. `8GiB` (parameter and buffer "
        "bytes; activations are not counted).")
    on_exceed: Literal["warn", "error"] = Field("warn", description="Warn, or raise BudgetExceededError.")


class Policy(BaseModel):
    """An offload policy: which components move between the device and host RAM, and when.

    Example::

        policy = offloadkit.load({"version": 1, "components": {"vae": {"strategy": "resident"}}})
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="offloadkit policy",
        json_schema_extra={"$id": SCHEMA_ID},
    )

    version: VersionOne = Field(description="Policy format version. Always 1.")
    name: str | None = Field(None, description="Short name shown in plans and traces.")
    description: str | None = Field(None, description="What the policy is for.")
    extends: str | None = Field(
        None,
        description="A built-in policy name or a path (relative to this file) whose keys this file overrides. "
        f"A chain of `extends` may be at most {MAX_EXTENDS} files long beyond this one.",
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="Execution device: `auto` (the accelerator, as diffusers picks it) or a torch device such "
        "as `cuda`, `cuda:1`, `cpu`.",
    )
    sequence: Literal["auto"] | list[str] = Field(
        "auto",
        description="Offload chain order. `auto` follows the pipeline's own `enable_model_cpu_offload`: its "
        "`model_cpu_offload_seq`, or where a pipeline overrides the switch the order the override hooks in (one "
        "chain per sub-pipeline for combined pipelines; AudioLDM2's explicit list), minus the components the "
        "policy takes out of the chain (another strategy, or `exclude`).",
    )
    exclude: Literal["auto"] | list[str] = Field(
        "auto",
        description="Components kept resident on the device, never offloaded. `auto` uses the pipeline's "
        "`_exclude_from_cpu_offload` for models outside the sequence (as diffusers does: an excluded model in "
        "the sequence, or in a `sequence` you write, is chained).",
    )
    components: dict[str, ComponentRule] = Field(
        default_factory=dict,
        description="Per-component rules, keyed by the pipeline's component name; `*` is the rule for "
        "every model without a rule of its own (after `exclude` and `quantization`).",
    )
    quantization: QuantizationRules = Field(
        default_factory=QuantizationRules,
        description="What to do with quantized components.",
    )
    budget: Budget | None = Field(None, description="Cap on resident weight bytes, checked at run time.")
    pinned_memory: AutoOrShare = Field(
        "auto",
        description="Most host RAM the policy's `stream` components pin (page-locked memory is a resource of "
        "the whole machine), a size or a share of host RAM. `auto`: half of host RAM on Linux, a quarter on "
        "Windows (where the driver caps it lower), none where there is no CUDA. Blocks beyond it stream from "
        "pageable memory; the plan says which.",
    )

    # Where the policy came from, for error messages that point into the file.
    _document: object = PrivateAttr(default=None)

    @property
    def display_name(self) -> str:
        return self.name or "unnamed policy"


def json_schema() -> dict:
    """The JSON Schema of a policy file, as editors and `offloadkit schema` use it."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def installed_schema_path() -> Path | None:
    """The schema file shipped with this offloadkit (the wheel's package data, or the checkout's `schemas/`), or
    None where neither is on disk (e.g. run from a zip)."""
    from importlib import resources

    try:
        candidate = resources.files(SCHEMA_PACKAGE) / SCHEMA_FILE
        if isinstance(candidate, Path) and candidate.is_file():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    # an editable install made before the package existed maps no `offloadkit.policy.schemas`: the checkout's file
    checkout = Path(__file__).resolve().parents[2] / "schemas" / SCHEMA_FILE
    return checkout if checkout.is_file() else None


def schema_comment(target: str | os.PathLike | None) -> str:
    """The first line of a policy file written at `target`: a `yaml-language-server` line that resolves to the
    installed schema (relative to the file's folder), or, where no path can be given, a comment saying why."""
    schema = installed_schema_path()
    if target is None or schema is None:
        why = "printed, not written to a file" if target is None else "this offloadkit ships no schema file"
        return (f"# No `$schema` line ({why}): `offloadkit synthesize -o FILE` adds one, or add "
                "`# yaml-language-server: $schema=PATH` for a copy written by `offloadkit schema -o PATH`.")
    folder = Path(target).resolve().parent
    try:
        where = Path(os.path.relpath(schema.resolve(), folder)).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        where = schema.resolve().as_uri()
    return f"# yaml-language-server: $schema={where}"


def with_schema_comment(text: str, target: str | os.PathLike | None) -> str:
    """`text` (a policy's YAML) with its first line replaced by `schema_comment(target)` when it is such a line."""
    first, newline, rest = text.partition("\n")
    if first.startswith("# yaml-language-server:") or first.startswith("# No `$schema` line"):
        return schema_comment(target) + newline + rest
    return schema_comment(target) + "\n" + text
