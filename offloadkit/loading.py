"""From a file, a built-in name or a dict to a validated `Policy`.

Steps: parse YAML with positions, follow `extends` (merging parent keys under
child keys), validate with pydantic, then run the checks a schema cannot express
(duplicates, a name both chained and excluded). Every problem is translated to
`file:line:col dotted.path: what is wrong. what to do.` and reported together.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from .errors import PolicyError, Problem, did_you_mean
from .schema import Budget, Policy, QuantizationRules
from .strategies import STRATEGIES
from .yaml_source import YamlDocument, parse_yaml

BUILTIN_PACKAGE = "offloadkit.policies"


def builtin_policies() -> dict[str, object]:
    """Built-in policy names mapped to their YAML resources (shipped in the wheel)."""
    found = {}
    for entry in resources.files(BUILTIN_PACKAGE).iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            found[entry.name.rsplit(".", 1)[0]] = entry
    return dict(sorted(found.items()))


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
        doc, base_dir, key = _read_source(source, base_dir=Path.cwd(), origin=None)
        return _load_document(doc, base_dir=base_dir, chain=(key,))
    raise PolicyError(f"cannot load a policy from {type(source).__name__} {source!r}. "
                      "Pass a file path, a built-in name, a dict or a Policy")


def _read_source(source, base_dir: Path, origin: Problem | None, builtins: dict | None = None,
                 what: str = "policy"):
    """Read a path or built-in name; returns (document, directory for relative extends, identity key).

    `builtins` (default: the built-in policies) and `what` let hardware profiles share this reader.
    """
    text = str(source)
    if builtins is None:
        builtins = builtin_policies()
    looks_like_path = (isinstance(source, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
                       or text in (".", ".."))
    if not looks_like_path and text in builtins:
        resource = builtins[text]
        return parse_yaml(resource.read_text(encoding="utf-8"), f"<builtin:{text}>"), base_dir, f"builtin:{text}"
    path = Path(text)
    if not path.is_absolute():
        path = base_dir / path
    try:
        is_file = path.is_file()
    except OSError as exc:  # e.g. a name longer than the file system allows
        is_file = False
        looks_like_path = True
        reason = exc.strerror
    else:
        reason = None
    if is_file:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            problem_text = f"cannot read {what} file {text!r} ({exc.strerror}). Check its permissions"
            if origin is not None:
                raise PolicyError(Problem(problem_text, origin.source, origin.path, origin.line,
                                          origin.column)) from None
            raise PolicyError(Problem(problem_text, text)) from None
        shown = str(source) if origin is None else _display_path(path)
        return parse_yaml(raw, shown), path.parent, str(path.resolve())
    if looks_like_path:
        shown = text if len(text) <= 80 else text[:77] + "..."
        message = f"{what} file {shown!r} not found"
        if reason is not None:
            message = f"cannot open {what} file {shown!r} ({reason})"
        elif path.is_dir():
            message = f"{shown!r} is a folder, not a {what} file"
        problem_text = f"{message}. Check the path (relative paths start from {base_dir})"
    else:
        plural = "policies" if what == "policy" else f"{what}s"
        problem_text = (f"no built-in {what} or file named {text!r}. "
                        + did_you_mean(text, builtins, f"built-in {plural}"))
    if origin is not None:
        raise PolicyError(Problem(problem_text, origin.source, origin.path, origin.line, origin.column))
    raise PolicyError(Problem(problem_text, text))


def _load_document(doc: YamlDocument, base_dir: Path, chain: tuple) -> Policy:
    data, positions = _merged(doc, base_dir, chain)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_translate(exc, data, positions, doc.source)) from None
    problems = internal_problems(policy, positions, doc.source)
    if problems:
        raise PolicyError(problems)
    policy._document = _Located(doc.source, positions)
    policy._chain = chain
    return policy


class _Located:
    """The positions of a merged policy: each path maps to the file and place it came from."""

    def __init__(self, source: str, positions: dict):
        self.source = source
        self.positions = positions

    def problem(self, path: tuple, message: str, key: bool = False) -> Problem:
        return _locate(self.positions, tuple(path), message, key, self.source)


def _locate(positions: dict, path: tuple, message: str, key: bool, default_source: str) -> Problem:
    probe = path
    while True:
        pos = positions.get((probe, key)) or positions.get((probe, False))
        if pos is not None:
            return Problem(message, pos.source, path, pos.line, pos.column)
        if not probe:
            return Problem(message, default_source, path)
        probe = probe[:-1]
        key = False


def _positions_of(doc: YamlDocument) -> dict:
    table = {}
    for path, pos in doc.value_positions.items():
        table[(path, False)] = pos
    for path, pos in doc.key_positions.items():
        table[(path, True)] = pos
    return table


def _merged(doc: YamlDocument, base_dir: Path, chain: tuple):
    """The document's data with its `extends` parents merged under it, and merged positions."""
    data = doc.data
    positions = _positions_of(doc)
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        raise PolicyError(_locate(positions, (), f"a policy must be a mapping of keys such as `version: 1`, "
                                                 f"not a {kind}. Start the file with `version: 1`",
                                  False, doc.source))
    parent_ref = data.get("extends")
    if parent_ref is None:
        return dict(data), positions
    origin = _locate(positions, ("extends",), "", False, doc.source)
    if not isinstance(parent_ref, str):
        raise PolicyError(Problem(f"`extends` must be a built-in name or a file path, not {parent_ref!r}. "
                                  "Write e.g. `extends: diffusers-default`",
                                  origin.source, origin.path, origin.line, origin.column))
    parent_doc, parent_dir, key = _read_source(parent_ref, base_dir, origin)
    if key in chain:
        cycle = " -> ".join(_short(k) for k in list(chain) + [key])
        raise PolicyError(Problem(f"`extends` makes a cycle ({cycle}). Remove one of the `extends` lines",
                                  origin.source, origin.path, origin.line, origin.column))
    parent_data, parent_positions = _merged(parent_doc, parent_dir, chain + (key,))
    return _merge(parent_data, parent_positions, data, positions)


def _display_path(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


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


# --- pydantic errors -> located problems --------------------------------------------------------

def _data_path(loc: tuple, data) -> tuple:
    """Drop the parts of a pydantic location that are not in the data (union tags, validator names)."""
    path = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in STRATEGIES and not path_is_tag(part):
            # a missing key: still part of the path shown to the user
            path.append(part)
            node = None
    return tuple(path)


def path_is_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


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
        strategy = STRATEGIES.get(rule.get("strategy")) if isinstance(rule, dict) else None
        if strategy is not None:
            return list(strategy.rule.model_fields)
        return ["strategy"]
    return []


def _expected_values(ctx: dict | None) -> list[str]:
    if not ctx:
        return []
    if "expected_tags" in ctx:
        return re.findall(r"'([^']*)'", str(ctx["expected_tags"]))
    return re.findall(r"'([^']*)'", str(ctx.get("expected", "")))


def _translate(exc: ValidationError, data: dict, positions: dict, source: str,
               allowed_keys=None) -> list[Problem]:
    """Pydantic errors as located problems. `allowed_keys(path, data)` lists the valid keys of a mapping
    for "did you mean" hints (default: a policy's); hardware profiles pass their own."""
    allowed_keys = allowed_keys or _allowed_keys
    problems: dict[tuple, Problem] = {}
    for err in exc.errors(include_url=False):
        kind = err["type"]
        path = _data_path(err["loc"], data)
        at_key = False
        value = err.get("input")
        if kind == "extra_forbidden":
            at_key = True
            key = path[-1] if path else err["loc"][-1]
            message = (f"unknown key {key!r}. " + did_you_mean(key, allowed_keys(path[:-1], data), "keys")
                       .replace("Valid keys", "Remove it or use one of the valid keys"))
        elif kind == "missing":
            message = f"required key {path[-1]!r} is missing."
            if path == ("version",):
                message += " Add `version: 1` at the top of the file"
            elif path[-1:] == ("strategy",):
                message += " Add one of: " + ", ".join(repr(s) for s in STRATEGIES)
            else:
                message += " Add it"
        elif kind in ("union_tag_invalid", "literal_error", "enum"):
            choices = _expected_values(err.get("ctx"))
            if path[-1:] == ("offload_buffers",):
                message = f"must be 'auto', true or false, not {value!r}. Use one of those"
            elif path and path[0] in ("sequence", "exclude") and len(path) == 1:
                message = f"must be 'auto' or a list of component names, not {value!r}. Write `{path[0]}: auto` or a list such as `[text_encoder, unet]`"
            else:
                what = "strategies" if kind == "union_tag_invalid" else "values"
                label = "strategy" if kind == "union_tag_invalid" else "value"
                shown = err.get("ctx", {}).get("tag", value)
                message = f"unknown {label} {shown!r}. " + did_you_mean(str(shown), choices, what)
                if path == ("version",):
                    message = f"unsupported version {value!r}. This offloadkit reads `version: 1`"
        elif kind == "union_tag_not_found":
            message = "a component rule needs a `strategy`. Add one of: " + ", ".join(repr(s) for s in STRATEGIES)
        elif kind == "string_pattern_mismatch" and path[-1:] == ("device",):
            message = (f"invalid device {value!r}. Use 'auto', 'cpu', or an accelerator such as 'cuda' or 'cuda:1'")
        elif kind in ("list_type", "string_type") and path and path[0] in ("sequence", "exclude") and len(path) == 1:
            message = f"must be 'auto' or a list of component names, not {value!r}. Write `{path[0]}: auto` or a list such as `[text_encoder, unet]`"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            message = f"must be a mapping, not {value!r}."
            if path[:1] == ("components",) and len(path) == 2:
                message += " Write e.g. `vae: {strategy: resident}`"
            elif path[:1] == ("components",):
                message += " Write e.g. `components: {vae: {strategy: resident}}`"
            else:
                message += " Give keys and values"
        elif kind == "string_type" and path and path[0] in ("sequence", "exclude"):
            message = f"must be a component name, not {value!r}. Quote it if it is one"
        elif kind == "string_type":
            message = f"must be a string, not {value!r}. Quote the value"
        elif kind == "bool_parsing":
            message = f"must be true or false, not {value!r}."
            if path and path[-1] == "offload_buffers":
                message = f"must be 'auto', true or false, not {value!r}. Use one of those"
        elif kind == "value_error":
            message = str(err.get("ctx", {}).get("error", err["msg"]))
        else:
            message = err["msg"].rstrip(".") + ". Fix the value"
        # A union reports one failure per branch at the same place; one message per place is enough.
        key = (path, at_key)
        if key not in problems or kind in ("union_tag_invalid", "literal_error", "extra_forbidden"):
            problems[key] = _locate(positions, path, message, at_key, source)
    # A union (`auto` or a list) reports the whole value and its items; the item errors say more.
    found = list(problems.values())
    found = [p for p in found if not any(q.path[: len(p.path)] == p.path and len(q.path) > len(p.path)
                                         for q in found)]
    return sorted(found, key=lambda p: (p.source, p.line or 0, p.column or 0, p.dotted_path))


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
                problems.append(_locate(positions, (key, i),
                                        f"{name!r} is listed twice (first at index {seen[name]}). Remove one",
                                        False, source))
            else:
                seen[name] = i
    if "sequence" in lists and "exclude" in lists:
        excluded = set(lists["exclude"])
        for i, name in enumerate(lists["sequence"]):
            if name in excluded:
                problems.append(_locate(positions, ("sequence", i),
                                        f"{name!r} is both in `sequence` (offloaded) and in `exclude` (kept on "
                                        "the device). Remove it from one of them", False, source))
    if "sequence" in lists:
        for i, name in enumerate(lists["sequence"]):
            rule = policy.components.get(name)
            if rule is not None and not STRATEGIES[rule.strategy].chained:
                problems.append(_locate(positions, ("sequence", i),
                                        f"{name!r} is in `sequence` but its rule says strategy "
                                        f"{rule.strategy!r}, which is not offloaded in a chain. Remove it from "
                                        "`sequence` or change its strategy", False, source))
    if "exclude" in lists:
        for i, name in enumerate(lists["exclude"]):
            rule = policy.components.get(name)
            if rule is not None and rule.strategy != "resident":
                problems.append(_locate(positions, ("exclude", i),
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


