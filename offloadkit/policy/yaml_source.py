"""Safe YAML loading that remembers where every key and value came from.

PyYAML's composer gives nodes with line/column marks; we build plain Python data
from those nodes ourselves so that each later error can point at `file:line:col`.
Only YAML's standard tags are constructed (SafeLoader's rules): `!!python/...`
and other custom tags are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ..errors import LocatedError, PolicyError, Problem

# Limits that keep a hostile or accidental file from exhausting memory or the stack.
MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 20_000


@dataclass(frozen=True)
class Position:
    source: str
    line: int
    column: int


@dataclass
class YamlDocument:
    """Plain data plus the position of every key and value, addressed by path tuples."""

    data: object
    source: str
    value_positions: dict = field(default_factory=dict)
    key_positions: dict = field(default_factory=dict)

    def position(self, path: tuple, *, key: bool = False) -> Position | None:
        """Position of the value at `path` (or of its key), falling back to the nearest parent."""
        path = tuple(path)
        while True:
            table = self.key_positions if key else self.value_positions
            if path in table:
                return table[path]
            if key and path in self.value_positions:
                return self.value_positions[path]
            if not path:
                return None
            path = path[:-1]
            key = False


def _mark(source: str, mark) -> Position:
    return Position(source, mark.line + 1, mark.column + 1)


def _problem(source: str, mark, message: str) -> Problem:
    if mark is None:
        return Problem(message, source)
    return Problem(message, source, (), mark.line + 1, mark.column + 1)


def parse_yaml(text: str | bytes, source: str = "<string>", *, error: type[LocatedError] = PolicyError) -> YamlDocument:
    """Parse one YAML document into plain data with positions; raise `error` (a `PolicyError`) on anything odd."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(Problem(f"file is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                                      "Save it as UTF-8", source)) from None
    if len(text) > MAX_BYTES:
        raise error(Problem(f"file is {len(text):,} characters long; policies are limited to "
                                  f"{MAX_BYTES:,}. Split it with `extends`", source))

    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader rejects control characters here already
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        hint = "Fix the YAML syntax"
        if "\t" in str(exc) or "'\\t'" in str(exc):
            hint = "Indent with spaces; YAML does not allow tabs"
        raise error(_problem(source, mark, f"invalid YAML: {what}. {hint}")) from None
    except yaml.reader.ReaderError as exc:
        raise error(Problem(f"invalid character {chr(exc.character)!r} (code {exc.character:#x}) at "
                                  f"character {exc.position}: {exc.reason}. Remove it; policies are plain text",
                                  source)) from None
    except yaml.YAMLError as exc:
        raise error(Problem(f"invalid YAML: {exc}. Fix the YAML syntax", source)) from None
    try:
        if root is None:
            raise error(Problem("file is empty. A policy starts with `version: 1`", source))
        doc = YamlDocument(None, source)
        builder = _Builder(loader, doc, error)
        doc.data = builder.build(root, (), 0)
        return doc
    finally:
        loader.dispose()


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, doc: YamlDocument, error: type[LocatedError]):
        self.loader = loader
        self.doc = doc
        self.error = error
        self.nodes = 0

    def fail(self, node, message: str):
        raise self.error(_problem(self.doc.source, node.start_mark, message))

    def build(self, node, path: tuple, depth: int):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.fail(node, f"document has more than {MAX_NODES:,} nodes (aliases count each time they are "
                            "used). Write a smaller policy")
        if depth > MAX_DEPTH:
            self.fail(node, f"document is nested deeper than {MAX_DEPTH} levels. Flatten it")
        self.doc.value_positions[path] = _mark(self.doc.source, node.start_mark)

        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                self.fail(node, f"unsupported YAML tag {node.tag!r}. Remove the tag")
            result: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.fail(key_node, "YAML merge keys (`<<`) are not supported. Use `extends` to reuse a policy")
                if not isinstance(key_node, yaml.ScalarNode):
                    self.fail(key_node, "mapping keys must be plain names. Use a name such as `unet`")
                key = self.scalar(key_node)
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    self.fail(key_node, f"mapping key {key!r} is not a name. Quote it or use a name such as `unet`")
                key = str(key)
                if key in result:
                    first = self.doc.key_positions[path + (key,)]
                    self.fail(key_node, f"duplicate key {key!r} (first at line {first.line}). Keep one of them")
                self.doc.key_positions[path + (key,)] = _mark(self.doc.source, key_node.start_mark)
                result[key] = self.build(value_node, path + (key,), depth + 1)
            return result

        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                self.fail(node, f"unsupported YAML tag {node.tag!r}. Remove the tag")
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]

        return self.scalar(node)

    def scalar(self, node):
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            self.fail(node, f"unsupported YAML tag {node.tag!r} ({exc.problem}). Policies may use only plain "
                            "YAML values: remove the tag")
