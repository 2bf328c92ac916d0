"""From a file, a built-in name or a dict to a validated `Policy`.

Steps: parse YAML with positions, follow `extends` (merging parent keys under
child keys; at most `MAX_EXTENDS` parents in a chain), validate with pydantic,
then run the checks a schema cannot express (duplicates, a name both chained and
excluded). Every problem is translated to
`file:line:col dotted.path: what is wrong. what to do.` and reported together.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..errors import PolicyError, Problem, quoted
from .documents import (DocumentKind, Located, builtin_documents, inherited, locate, positions_of, read_source,
                        translate)
from .rules import RULES, ResidentRule
from .schema import MAX_EXTENDS, Budget, Policy, QuantizationRules
from .yaml_source import YamlDocument

BUILTIN_PACKAGE = "offloadkit.policy.builtin"


def builtin_policies() -> dict[str, object]:
    """Built-in policy names mapped to their YAML resources (shipped in the wheel)."""
    return builtin_documents(BUILTIN_PACKAGE)


POLICY = DocumentKind("policy", "policies", builtin_policies, PolicyError)


def load(source) -> Policy:
    """Load and validate a policy from a path, a built-in name, a dict or a `Policy`.

    Example::

        policy = offloadkit.load("sdxl.yaml")
        policy = offloadkit.load("diffusers-default")
        policy = offloadkit.load({"version": 1, "components": {"vae": {"strategy": "resident"}}})

    Raises `PolicyError` listing every problem with its `file:line:col`.
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, dict):
        doc = YamlDocument(source, "<dict>")
        return _load_document(doc, base_dir=Path.cwd(), chain=("<dict>",))
    if isinstance(source, (str, os.PathLike)):
        doc, base_dir, key = read_source(source, Path.cwd(), None, POLICY)
        return _load_document(doc, base_dir=base_dir, chain=(key,))
    raise PolicyError(f"cannot load a policy from {type(source).__name__} {quoted(source)}. "
                      "Pass a file path, a built-in name, a dict or a Policy")


def _load_document(doc: YamlDocument, base_dir: Path, chain: tuple) -> Policy:
    data, positions = _merged(doc, base_dir, chain)
    extends_at = positions.get((("extends",), False)) if doc.data.get("extends") is not None else None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems = translate(exc, data, positions, doc.source, _allowed_keys)
        raise PolicyError([inherited(p, doc.source, extends_at) for p in problems]) from None
    problems = internal_problems(policy, positions, doc.source)
    if problems:
        raise PolicyError([inherited(p, doc.source, extends_at) for p in problems])
    policy._document = Located(doc.source, positions, extends_at)
    return policy


def _merged(doc: YamlDocument, base_dir: Path, chain: tuple, root_extends: Problem | None = None):
    """The document's data with its `extends` parents merged under it, and merged positions.

    `root_extends` is the `extends` line of the file the user asked about: problems found further up the
    chain name it too.
    """
    data = doc.data
    positions = positions_of(doc)
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        raise PolicyError(locate(positions, (), f"a policy must be a mapping of keys such as `version: 1`, "
                                                 f"not a {kind}. Start the file with `version: 1`",
                                  False, doc.source))
    foreign = hardware_profile_problem(data, positions, doc.source)
    if foreign is not None:
        raise PolicyError(inherited(foreign, root_extends.source, root_extends) if root_extends else foreign)
    parent_ref = data.get("extends")
    if parent_ref is None:
        return dict(data), positions
    origin = locate(positions, ("extends",), "", False, doc.source)
    root_extends = root_extends or origin
    if not isinstance(parent_ref, str):
        raise PolicyError(Problem(f"`extends` must be a built-in name or a file path, not {quoted(parent_ref)}. "
                                  "Write e.g. `extends: diffusers-default`",
                                  origin.source, origin.path, origin.line, origin.column))
    if len(chain) > MAX_EXTENDS:  # checked before reading: a chain of 1,000 files stops at the 17th
        files = [_short(k) for k in chain]
        shown = " -> ".join(files if len(files) <= 6 else files[:3] + ["..."] + files[-2:])
        raise PolicyError(_at_each(f"`extends` chain is longer than {MAX_EXTENDS} files ({shown} -> "
                                   f"{quoted(parent_ref)}). Merge some of them into one file",
                                   root_extends, origin))
    try:
        parent_doc, parent_dir, key = read_source(parent_ref, base_dir, origin, POLICY)
    except PolicyError as exc:  # not found, or unreadable YAML in a parent file
        raise PolicyError([inherited(p, root_extends.source, root_extends) for p in exc.problems]) from None
    if key in chain:
        cycle = " -> ".join(_short(k) for k in list(chain) + [key])
        raise PolicyError(_at_each(f"`extends` makes a cycle ({cycle}). Remove one of the `extends` lines",
                                   root_extends, origin))
    parent_data, parent_positions = _merged(parent_doc, parent_dir, chain + (key,), root_extends)
    return _merge(parent_data, parent_positions, data, positions)


# Top-level keys only a hardware profile has (`prediction.hardware.HardwareProfile`; this floor may not import
# it, and tests/test_loading.py checks the two lists agree).
HARDWARE_PROFILE_KEYS = ("nominal", "device_memory", "host_memory", "h2d_pinned", "h2d_pageable", "d2h", "disk_read",
                         "compute", "compute_dtype", "compute_efficiency", "measured", "device_headroom",
                         "host_headroom", "disk_free")
# Top-level keys only a policy has (a hardware profile's loader says "this is a policy" on them).
POLICY_ONLY_KEYS = ("extends", "sequence", "exclude", "components", "quantization", "budget")


def hardware_profile_problem(data: dict, positions: dict, source: str) -> Problem | None:
    """One problem for a hardware profile passed as a policy, instead of an unknown-key error per profile key.

    Two of its keys and none of a policy's own: a policy with one stray `device_memory` key still gets the
    ordinary unknown-key error with its "did you mean".
    """
    theirs = [k for k in data if k in HARDWARE_PROFILE_KEYS]
    if len(theirs) < 2 or any(k in POLICY_ONLY_KEYS for k in data):
        return None
    listed = ", ".join(f"`{k}`" for k in theirs[:3]) + (", ..." if len(theirs) > 3 else "")
    return locate(positions, (), f"this is a hardware profile, not a policy (it has {listed}). Pass it with "
                                 "--hardware (`offloadkit validate POLICY --pipeline MODEL --hardware FILE`), or "
                                 "in Python to `load_hardware()`", False, source)


def _at_each(message: str, *origins: Problem) -> list[Problem]:
    """The same problem at each distinct place, in order (the file the user asked about first)."""
    places = dict.fromkeys((o.source, o.path, o.line, o.column) for o in origins)
    return [Problem(message, *place) for place in places]


def _short(key: str) -> str:
    return key if key.startswith("builtin:") else Path(key).name


def _merge(parent: dict, parent_pos: dict, child: dict, child_pos: dict):
    """Child keys override parent keys; `components` merge per component, `quantization`/`budget` per key.

    `name`, `description` and `extends` belong to one file and are not inherited.
    """
    merged = {k: v for k, v in parent.items() if k not in ("name", "description", "extends")}
    dropped = {("name",), ("description",), ("extends",)}  # prefixes of parent positions the child replaces
    for key, value in child.items():
        if key in ("components", "quantization", "budget") and isinstance(value, dict) \
                and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
            dropped.update((key, sub) for sub in value)
        else:
            merged[key] = value
            dropped.add((key,))
    # one pass over the parent's positions (not one per replaced key: 5,000 components would be quadratic)
    positions = {entry: pos for entry, pos in parent_pos.items()
                 if entry[0] and entry[0][:1] not in dropped and entry[0][:2] not in dropped}
    positions.update(child_pos)
    return merged, positions


def _allowed_keys(path: tuple, data) -> list[str]:
    """Valid keys at a mapping inside a policy, for 'did you mean' hints."""
    if path == ():
        return list(Policy.model_fields)
    if path == ("quantization",):
        return list(QuantizationRules.model_fields)
    if path == ("budget",):
        return list(Budget.model_fields)
    if len(path) == 2 and path[0] == "components":
        rule = data.get("components", {}).get(path[1], {})
        rule_class = RULES.get(rule.get("strategy")) if isinstance(rule, dict) else None
        if rule_class is not None:
            return list(rule_class.model_fields)
        return ["strategy"]
    return []


# --- checks the schema cannot express ----------------------------------------------------------

def internal_problems(policy: Policy, positions: dict, source: str) -> list[Problem]:
    """Duplicates and contradictions inside one policy (no pipeline needed)."""
    problems = []
    lists = {}
    for key in ("sequence", "exclude"):
        names = getattr(policy, key)
        if names == "auto":
            continue
        lists[key] = names
        seen = {}
        for i, name in enumerate(names):
            if name in seen:
                problems.append(locate(positions, (key, i),
                                        f"{quoted(name)} is listed twice (first at index {seen[name]}). Remove one",
                                        False, source))
            else:
                seen[name] = i
    if "sequence" in lists and "exclude" in lists:
        excluded = set(lists["exclude"])
        for i, name in enumerate(lists["sequence"]):
            if name in excluded:
                problems.append(locate(positions, ("sequence", i),
                                        f"{quoted(name)} is both in `sequence` (offloaded) and in `exclude` (kept on "
                                        "the device). Remove it from one of them", False, source))
    if "sequence" in lists:
        for i, name in enumerate(lists["sequence"]):
            rule = policy.components.get(name)
            if rule is not None and not rule.chained:
                problems.append(locate(positions, ("sequence", i),
                                        f"{quoted(name)} is in `sequence` but its rule says strategy "
                                        f"{rule.strategy!r}, which is not offloaded in a chain. Remove it from "
                                        "`sequence` or change its strategy", False, source))
    if "exclude" in lists:
        for i, name in enumerate(lists["exclude"]):
            rule = policy.components.get(name)
            if rule is not None and not isinstance(rule, ResidentRule):
                problems.append(locate(positions, ("exclude", i),
                                        f"{quoted(name)} is in `exclude` (kept resident) but its rule says strategy "
                                        f"{rule.strategy!r}. Remove it from `exclude` or from `components`",
                                        False, source))
    return problems


def located_problem(policy: Policy, path: tuple, message: str, key: bool = False) -> Problem:
    """A problem pointing at `path` in the file the policy came from (for checks against a pipeline)."""
    document = policy._document
    if document is None:
        return Problem(message, "<policy>", tuple(path))
    return document.problem(path, message, key)


