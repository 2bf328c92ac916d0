"""From a file, a built-in name or a dict to a validated `Policy`.

Steps: parse YAML with positions, follow `extends` (merging parent keys under
child keys), validate with pydantic, then run the checks a schema cannot express
(duplicates, a name both chained and excluded). Every problem is translated to
`file:line:col dotted.path: what is wrong. what to do.` and reported together.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..errors import PolicyError, Problem
from .documents import DocumentKind, Located, builtin_documents, locate, positions_of, read_source, translate
from .rules import RULES, ResidentRule
from .schema import Budget, Policy, QuantizationRules
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
        return _load_document(doc, base_dir=Path.cwd(), chain=())
    if isinstance(source, (str, os.PathLike)):
        doc, base_dir, key = read_source(source, Path.cwd(), None, POLICY)
        return _load_document(doc, base_dir=base_dir, chain=(key,))
    raise PolicyError(f"cannot load a policy from {type(source).__name__} {source!r}. "
                      "Pass a file path, a built-in name, a dict or a Policy")


def _load_document(doc: YamlDocument, base_dir: Path, chain: tuple) -> Policy:
    data, positions = _merged(doc, base_dir, chain)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(translate(exc, data, positions, doc.source, _allowed_keys)) from None
    problems = internal_problems(policy, positions, doc.source)
    if problems:
        raise PolicyError(problems)
    policy._document = Located(doc.source, positions)
    return policy


def _merged(doc: YamlDocument, base_dir: Path, chain: tuple):
    """The document's data with its `extends` parents merged under it, and merged positions."""
    data = doc.data
    positions = positions_of(doc)
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        raise PolicyError(locate(positions, (), f"a policy must be a mapping of keys such as `version: 1`, "
                                                 f"not a {kind}. Start the file with `version: 1`",
                                  False, doc.source))
    parent_ref = data.get("extends")
    if parent_ref is None:
        return dict(data), positions
    origin = locate(positions, ("extends",), "", False, doc.source)
    if not isinstance(parent_ref, str):
        raise PolicyError(Problem(f"`extends` must be a built-in name or a file path, not {parent_ref!r}. "
                                  "Write e.g. `extends: diffusers-default`",
                                  origin.source, origin.path, origin.line, origin.column))
    parent_doc, parent_dir, key = read_source(parent_ref, base_dir, origin, POLICY)
    if key in chain:
        cycle = " -> ".join(_short(k) for k in list(chain) + [key])
        raise PolicyError(Problem(f"`extends` makes a cycle ({cycle}). Remove one of the `extends` lines",
                                  origin.source, origin.path, origin.line, origin.column))
    parent_data, parent_positions = _merged(parent_doc, parent_dir, chain + (key,))
    return _merge(parent_data, parent_positions, data, positions)


def _short(key: str) -> str:
    return key if key.startswith("builtin:") else Path(key).name


def _merge(parent: dict, parent_pos: dict, child: dict, child_pos: dict):
    """Child keys override parent keys; `components` merge per component, `quantization`/`budget` per key.

    `name`, `description` and `extends` belong to one file and are not inherited.
    """
    merged = {k: v for k, v in parent.items() if k not in ("name", "description", "extends")}
    positions = {k: v for k, v in parent_pos.items() if k[0][:1] not in (("name",), ("description",), ("extends",))}
    positions.pop(((), False), None)
    for key, value in child.items():
        if key in ("components", "quantization", "budget") and isinstance(value, dict) \
                and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
            for sub in value:
                _drop_subtree(positions, (key, sub))
        else:
            merged[key] = value
            _drop_subtree(positions, (key,))
    positions.update(child_pos)
    return merged, positions


def _drop_subtree(positions: dict, prefix: tuple):
    for entry in [e for e in positions if e[0][: len(prefix)] == prefix]:
        del positions[entry]


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
                                        f"{name!r} is listed twice (first at index {seen[name]}). Remove one",
                                        False, source))
            else:
                seen[name] = i
    if "sequence" in lists and "exclude" in lists:
        excluded = set(lists["exclude"])
        for i, name in enumerate(lists["sequence"]):
            if name in excluded:
                problems.append(locate(positions, ("sequence", i),
                                        f"{name!r} is both in `sequence` (offloaded) and in `exclude` (kept on "
                                        "the device). Remove it from one of them", False, source))
    if "sequence" in lists:
        for i, name in enumerate(lists["sequence"]):
            rule = policy.components.get(name)
            if rule is not None and not rule.chained:
                problems.append(locate(positions, ("sequence", i),
                                        f"{name!r} is in `sequence` but its rule says strategy "
                                        f"{rule.strategy!r}, which is not offloaded in a chain. Remove it from "
                                        "`sequence` or change its strategy", False, source))
    if "exclude" in lists:
        for i, name in enumerate(lists["exclude"]):
            rule = policy.components.get(name)
            if rule is not None and not isinstance(rule, ResidentRule):
                problems.append(locate(positions, ("exclude", i),
                                        f"{name!r} is in `exclude` (kept resident) but its rule says strategy "
                                        f"{rule.strategy!r}. Remove it from `exclude` or from `components`",
                                        False, source))
    return problems


def located_problem(policy: Policy, path: tuple, message: str, key: bool = False) -> Problem:
    """A problem pointing at `path` in the file the policy came from (for checks against a pipeline)."""
    document = policy._document
    if document is None:
        return Problem(message, "<policy>", tuple(path))
    return document.problem(path, message, key)


