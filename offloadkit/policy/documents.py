"""Reading YAML documents (policies and hardware profiles) into data with every problem located.

The one machinery both kinds of file share: finding a file or a built-in by name,
parsing it with positions (`yaml_source`), and turning pydantic's errors into
`file:line:col dotted.path: what is wrong. what to do.` problems. A `DocumentKind`
says what the document is called, where its built-ins are and which error it raises.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from ..errors import LocatedError, Problem, closest, did_you_mean, quoted
from .rules import RULES, strategy_names
from .yaml_source import MAX_BYTES, Position, YamlDocument, parse_yaml, too_large


def builtin_documents(package: str) -> dict[str, object]:
    """The YAML resources of a package (shipped in the wheel), by name without the extension, sorted."""
    found = {}
    for entry in resources.files(package).iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            found[entry.name.rsplit(".", 1)[0]] = entry
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class DocumentKind:
    """What a kind of document is called, where its built-ins are, and the error its problems raise."""

    noun: str  # "policy", "hardware profile"
    plural: str
    builtins: Callable[[], dict]
    error: type[LocatedError]

    def fail(self, problem: Problem | str, origin: Problem | None = None):
        """Raise this kind's error; with `origin`, located where the reference to the document was."""
        if origin is not None and isinstance(problem, str):
            problem = Problem(problem, origin.source, origin.path, origin.line, origin.column)
        raise self.error(problem)


def read_source(source, base_dir: Path, origin: Problem | None, kind: DocumentKind):
    """Read a path or built-in name; returns (document, directory for relative references, identity key).

    `origin` is where the reference was (an `extends` line), for problems located there.
    """
    text = str(source)
    what = kind.noun
    builtins = kind.builtins()
    looks_like_path = (isinstance(source, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
                       or text in (".", ".."))
    if not looks_like_path and text in builtins:
        resource = builtins[text]
        return (parse_yaml(resource.read_text(encoding="utf-8"), f"<builtin:{text}>", error=kind.error), base_dir,
                f"builtin:{text}")
    path = Path(text)
    if not path.is_absolute():
        path = base_dir / path
    try:
        is_file = path.is_file()
        exists = is_file or path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        is_file = exists = False
        looks_like_path = True
        reason = exc.strerror
    else:
        reason = None
    shown_text = repr(text if len(text) <= 80 else text[:77] + "...")
    if is_file:
        shown = display_path(path, text)
        raw = _read_bytes(path, shown, shown_text, what, kind, origin)
        return parse_yaml(raw, shown, error=kind.error), path.parent, str(path.resolve())
    if looks_like_path or exists:
        message = f"{what} file {shown_text} not found"
        if reason is not None:
            message = f"cannot open {what} file {shown_text} ({reason})"
        elif path.is_dir():
            message = f"{shown_text} is a folder, not a {what} file"
        elif exists:  # /dev/zero, a FIFO, a socket: reading could block or never end
            message = f"{shown_text} is not a regular file (a device, a pipe or a socket), so not a {what} file"
        elif (through := _missing_folder(text, base_dir)) is not None:
            # labelled as written: the normalised path is a file, and "team.yaml: ... not found" would puzzle
            fix = (f"{message}: it goes up (`..`) out of {through!r}, which does not exist. Write "
                   f"{os.path.normpath(text)!r}")
            kind.fail(fix if origin is not None else Problem(fix, text), origin)
        problem_text = f"{message}. Check the path (relative paths start from {os.path.normpath(base_dir)})"
    else:
        problem_text = (f"no built-in {what} or file named {shown_text}. "
                        + did_you_mean(text, builtins, f"built-in {kind.plural}"))
    shown = display_path(path, text) if looks_like_path else text
    kind.fail(problem_text if origin is not None else Problem(problem_text, shown), origin)


def _missing_folder(text: str, base_dir: Path) -> str | None:
    """The folder, as written, that `..` climbs out of but does not exist, where the path without it would be
    a file: the system resolves `other/../team.yaml` only when `other` exists."""
    parts = Path(text).parts
    if ".." not in parts or not os.path.isfile(os.path.normpath(base_dir / text)):
        return None
    for i in range(len(parts)):
        if parts[i] != ".." and not (base_dir / Path(*parts[:i + 1])).exists():
            return str(Path(*parts[:i + 1]))
    return None


def _read_bytes(path: Path, shown: str, shown_text: str, what: str, kind: DocumentKind, origin) -> bytes:
    """The file's bytes; one over `MAX_BYTES` is refused from its size, before anything is read."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise kind.error(too_large(size, shown))
        with path.open("rb") as file:
            return file.read(MAX_BYTES + 1)  # not `size`: procfs says 0, and the file may have grown since
    except OSError as exc:
        problem_text = f"cannot read {what} file {shown_text} ({exc.strerror}). Check its permissions"
        kind.fail(problem_text if origin is not None else Problem(problem_text, shown), origin)


def display_path(path: Path, written: str | None = None) -> str:
    """A file as messages show it: normalised (`other/../team.yaml` is `team.yaml`), relative to the working
    folder unless it was `written` absolute.

    Lexical normalisation is only a label: where a symlinked folder makes `a/..` another place than `.`, the
    resolved path is shown instead.
    """
    normal = os.path.normpath(path)
    if normal != str(path):
        try:
            same = os.path.samefile(normal, path)
        except OSError:  # one of them is not there: the file itself missing (a "not found" message) leaves
            same = not os.path.exists(path)  # only the lexical form; else `normal` is not where it is
        if not same:
            normal = str(Path(path).resolve())
    if written is not None and os.path.isabs(written):
        return normal
    try:
        return os.path.relpath(normal)
    except ValueError:  # another drive on Windows
        return normal



def positions_of(doc: YamlDocument) -> dict:
    """(path, is_key) -> Position of every key and value of a document."""
    table = {}
    for path, pos in doc.value_positions.items():
        table[(path, False)] = pos
    for path, pos in doc.key_positions.items():
        table[(path, True)] = pos
    return table


class Located:
    """The positions of a merged policy: each path maps to the file and place it came from.

    `extends_at` is the position of the policy's own `extends` line, which problems found in a parent name.
    """

    def __init__(self, source: str, positions: dict, extends_at: Position | None = None):
        self.source = source
        self.positions = positions
        self.extends_at = extends_at

    def problem(self, path: tuple, message: str, key: bool = False) -> Problem:
        return inherited(locate(self.positions, tuple(path), message, key, self.source), self.source,
                         self.extends_at)


def inherited(problem: Problem, source: str, extends_at: Position | Problem | None) -> Problem:
    """A problem located in a file that `source` extends, also naming `source` (the file the user asked about)
    and its `extends` line; other problems as they are."""
    if extends_at is None or problem.source == source:
        return problem
    fix = f"override it in {source}" if problem.source.startswith("<builtin:") else \
        f"fix it there or override it in {source}"
    return dataclasses.replace(problem, message=f"{problem.message} (inherited through `extends` at "
                                                f"{source}:{extends_at.line}:{extends_at.column}; {fix})")


def locate(positions: dict, path: tuple, message: str, key: bool, default_source: str) -> Problem:
    probe = path
    while True:
        pos = positions.get((probe, key)) or positions.get((probe, False))
        if pos is not None:
            return Problem(message, pos.source, path, pos.line, pos.column)
        if not probe:
            return Problem(message, default_source, path)
        probe = probe[:-1]
        key = False


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
        elif isinstance(node, dict) and isinstance(part, str) and part not in RULES and not path_is_tag(part):
            # a missing key: still part of the path shown to the user
            path.append(part)
            node = None
    return tuple(path)


def path_is_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _expected_values(ctx: dict | None) -> list[str]:
    if not ctx:
        return []
    if "expected_tags" in ctx:
        return re.findall(r"'([^']*)'", str(ctx["expected_tags"]))
    return re.findall(r"'([^']*)'", str(ctx.get("expected", "")))


def translate(exc: ValidationError, data: dict, positions: dict, source: str, allowed_keys) -> list[Problem]:
    """Pydantic errors as located problems. `allowed_keys(path, data)` lists the valid keys of a mapping
    for "did you mean" hints."""
    problems: dict[tuple, Problem] = {}
    beside: dict[tuple, Problem] = {}  # problems inside a rule reported beside its own (not folded into it)
    rule_keys = list(dict.fromkeys(k for rule_class in RULES.values() for k in rule_class.model_fields))
    for err in exc.errors(include_url=False):
        kind = err["type"]
        path = _data_path(err["loc"], data)
        at_key = False
        value = err.get("input")
        if kind == "extra_forbidden":
            at_key = True
            key = path[-1] if path else err["loc"][-1]
            message = (f"unknown key {quoted(key)}. " + did_you_mean(key, allowed_keys(path[:-1], data), "keys")
                       .replace("Valid keys", "Remove it or use one of the valid keys"))
        elif kind == "missing":
            message = f"required key {quoted(path[-1])} is missing."
            if path == ("version",):
                message += " Add `version: 1` at the top of the file"
            elif path[-1:] == ("strategy",):
                message += " Add one of: " + ", ".join(repr(s) for s in strategy_names())
            else:
                message += " Add it"
        elif kind in ("union_tag_invalid", "literal_error", "enum"):
            choices = _expected_values(err.get("ctx"))
            if path[-1:] == ("offload_buffers",):
                message = f"must be 'auto', true or false, not {quoted(value)}. Use one of those"
            elif path and path[0] in ("sequence", "exclude") and len(path) == 1:
                message = (f"must be 'auto' or a list of component names, not {quoted(value)}. Write "
                       f"`{path[0]}: auto` or a list such as `[text_encoder, unet]`")
            else:
                what = "strategies" if kind == "union_tag_invalid" else "values"
                label = "strategy" if kind == "union_tag_invalid" else "value"
                shown = err.get("ctx", {}).get("tag", value)
                message = f"unknown {label} {quoted(shown)}. " + did_you_mean(str(shown), choices, what)
                if path == ("version",):
                    message = f"unsupported version {quoted(value)}. This offloadkit reads `version: 1`"
            if kind == "union_tag_invalid":
                beside.update(_unknown_rule_keys(value, path, positions, source, rule_keys))
        elif kind == "union_tag_not_found":
            message = "a component rule needs a `strategy`. Add one of: " + ", ".join(repr(s) for s in strategy_names())
            beside.update(_unknown_rule_keys(value, path, positions, source, rule_keys))
        elif kind == "string_pattern_mismatch" and path[-1:] == ("device",):
            message = (f"invalid device {quoted(value)}. Use 'auto', 'cpu', or an accelerator such as 'cuda' or "
                       "'cuda:1'")
        elif kind in ("list_type", "string_type") and path and path[0] in ("sequence", "exclude") and len(path) == 1:
            message = (f"must be 'auto' or a list of component names, not {quoted(value)}. Write "
                       f"`{path[0]}: auto` or a list such as `[text_encoder, unet]`")
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            message = f"must be a mapping, not {quoted(value)}."
            if path[:1] == ("components",) and len(path) == 2:
                message += " Write e.g. `vae: {strategy: resident}`"
            elif path[:1] == ("components",):
                message += " Write e.g. `components: {vae: {strategy: resident}}`"
            else:
                message += " Give keys and values"
        elif kind == "string_type" and path and path[0] in ("sequence", "exclude"):
            message = f"must be a component name, not {quoted(value)}. Quote it if it is one"
        elif kind == "bool_parsing" and path and path[-1] == "offload_buffers":
            message = f"must be 'auto', true or false, not {quoted(value)}. Use one of those"
        elif kind == "value_error" and path == ("version",):
            message = _version_message(value, str(err.get("ctx", {}).get("error", err["msg"])))
        elif kind in ("value_error", "assertion_error"):
            message = str(err.get("ctx", {}).get("error", err["msg"]))
        else:
            message = _plain_message(kind, value, err.get("ctx") or {}, err["msg"])
        # A union reports one failure per branch at the same place; one message per place is enough.
        key = (path, at_key)
        if key not in problems or kind in ("union_tag_invalid", "literal_error", "extra_forbidden"):
            problems[key] = locate(positions, path, message, at_key, source)
    # A union (`auto` or a list) reports the whole value and its items; the item errors say more.
    # Linear: every proper prefix of every path, then one look-up per problem (6,000 problems took 3 s).
    found = list(problems.values())
    parents = {q.path[:i] for q in found for i in range(len(q.path))}
    found = [p for p in found if p.path not in parents] + list(beside.values())
    return sorted(found, key=lambda p: (p.source, p.line or 0, p.column or 0, p.dotted_path))


def _unknown_rule_keys(rule, path: tuple, positions: dict, source: str, every_key: list[str]) -> dict:
    """Keys no strategy has, in a rule whose strategy is wrong or missing.

    Pydantic stops at the bad `strategy` tag, so a typo beside it (`trasnfer`) would surface only once the
    strategy is fixed; a key that is no strategy's option is wrong whatever the strategy becomes.
    """
    found = {}
    if not isinstance(rule, dict):
        return found
    for key in rule:
        if key in every_key:
            continue
        match = closest(key, every_key)
        hint = f"Did you mean {match!r}? " if match else ""
        found[path + (key,)] = locate(
            positions, path + (key,), f"unknown key {quoted(key)}: no strategy has this option. {hint}Remove it "
            "(`offloadkit schema` lists each strategy's options)", True, source)
    return found


def _version_message(value, fallback: str) -> str:
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]*)?\s*", value):
        return (f"must be a number, not the string {quoted(value)}. Write `version: 1` without quotes")
    if isinstance(value, bool):
        return f"must be the number 1, not {str(value).lower()}. Write `version: 1`"
    if isinstance(value, float) and value == 1:
        return "must be the whole number 1, not 1.0. Write `version: 1`"
    return fallback


def _bound(number) -> str:
    """A bound from pydantic's context as a policy writes it (`1`, not `1.0`)."""
    return str(int(number)) if isinstance(number, float) and number.is_integer() else str(number)


# The pydantic error types `_plain_message` words itself (the others keep their own branches in `translate`);
# tests walk the schemas and check every type met is worded by offloadkit.
WORDED = frozenset({
    "extra_forbidden", "missing", "union_tag_invalid", "union_tag_not_found", "literal_error", "enum",
    "value_error", "assertion_error", "dict_type", "model_type", "model_attributes_type",
    "string_type", "string_pattern_mismatch", "string_too_short", "string_too_long",
    "bool_type", "bool_parsing", "int_type", "int_parsing", "int_from_float", "int_parsing_size",
    "float_type", "float_parsing", "finite_number", "greater_than", "greater_than_equal", "less_than",
    "less_than_equal", "multiple_of", "list_type", "tuple_type", "set_type", "too_short", "too_long",
    "none_required", "datetime_type", "datetime_parsing", "datetime_from_date_parsing", "datetime_object_invalid",
    "timezone_aware", "timezone_naive",
})


def _plain_message(kind: str, value, ctx: dict, fallback: str) -> str:
    """Pydantic's error of one value, in offloadkit's words: what the value must be, and what to write."""
    shown = quoted(value)
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, not {shown}. Write `true` or `false`"
    if kind == "string_type":
        return f"must be a string, not {shown}. Quote the value"
    if kind in ("int_type", "int_parsing", "int_parsing_size"):
        return f"must be a whole number, not {shown}. Write a number without quotes, e.g. `2`"
    if kind == "int_from_float":
        low = int(value) if isinstance(value, (int, float)) and abs(value) < 1e18 else None
        example = f"`{low}` or `{low + 1}`" if low is not None else "e.g. `2`"
        return f"must be a whole number, not {shown}. Write {example}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, not {shown}. Write a number without quotes, e.g. `0.5`"
    if kind == "finite_number":
        return f"must be a finite number, not {shown}. Write e.g. `0.5`"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"):
        bound = ctx.get("gt", ctx.get("ge", ctx.get("lt", ctx.get("le", ctx.get("multiple_of")))))
        b = _bound(bound)
        must, write = {"greater_than": (f"above {b}", f"a number above {b}"),
                       "greater_than_equal": (f"at least {b}", f"{b} or more"),
                       "less_than": (f"below {b}", f"a number below {b}"),
                       "less_than_equal": (f"at most {b}", f"{b} or less"),
                       "multiple_of": (f"a multiple of {b}", f"a multiple of {b}")}[kind]
        return f"must be {must}, not {shown}. Write {write}"
    if kind in ("list_type", "tuple_type", "set_type"):
        return f"must be a list, not {shown}. Write a list in brackets, e.g. `[a, b]`"
    if kind in ("too_short", "too_long"):
        count = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        words = "at least" if kind == "too_short" else "at most"
        return f"must have {words} {count} items, not {ctx.get('actual_length', 'another number')}. Add or " \
               "remove items"
    if kind in ("string_too_short", "string_too_long"):
        count = ctx.get("min_length") if kind == "string_too_short" else ctx.get("max_length")
        words = "at least" if kind == "string_too_short" else "at most"
        return f"must be {words} {count} characters long, not {shown}. Write another value"
    if kind == "string_pattern_mismatch":
        return f"{shown} does not have the expected form (pattern {ctx.get('pattern', '?')}). Write a value of " \
               "that form"
    if kind == "none_required":
        return f"must be left out (or null), not {shown}. Remove it"
    if kind in ("datetime_type", "datetime_parsing", "datetime_from_date_parsing", "datetime_object_invalid"):
        return f"must be a date and time, not {shown}. Write e.g. `2025-06-01T12:00:00Z`"
    if kind == "timezone_aware":
        return f"{shown} has no time zone. Add one: `Z` for UTC or an offset such as `+02:00`"
    if kind == "timezone_naive":
        return f"{shown} must not have a time zone. Remove it"
    # A type no schema here produces today: pydantic's phrase, reworded as ours ("Input should be" -> "must be").
    text = re.sub(r"^Input should (be |have )?", lambda m: "must " + (m.group(1) or ""), fallback.rstrip("."))
    return f"{text}, not {shown}. Write a value of that kind"
