"""Safe YAML loading that remembers where every key and value came from.

PyYAML's composer gives nodes with line/column marks; we build plain Python data
from those nodes ourselves so that each later error can point at `file:line:col`.
Only YAML's standard tags are constructed (SafeLoader's rules): `!!python/...`
and other custom tags are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from ..errors import LocatedError, PolicyError, Problem, one_line, quoted

# Limits that keep a hostile or accidental file from exhausting memory or the stack.
MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_NUMBER_CHARS = 100  # a size in bytes needs 20 digits; no policy value needs 100


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
    if mark is None:  # whole-file problems point at its start, so every problem has a line and a column
        return Problem(message, source, (), 1, 1)
    return Problem(message, source, (), mark.line + 1, mark.column + 1)


# YAML's line breaks, as PyYAML counts lines (`\r\n` is one break), so our positions match its marks.
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def text_position(text: str, index: int) -> tuple[int, int]:
    """(line, column), both from 1, of the character at `index` of `text`."""
    line, line_start = 1, 0
    for match in _LINE_BREAK.finditer(text, 0, index):
        line, line_start = line + 1, match.end()
    column = index - line_start + 1
    if line == 1 and text.startswith("\ufeff"):  # PyYAML does not count a byte-order mark as a column
        column -= 1
    return line, max(column, 1)


def too_large(size: int, source: str) -> Problem:
    """The problem of a file over `MAX_BYTES` (checked before it is read where the size is known)."""
    return Problem(f"file is {size:,} bytes long; files are limited to {MAX_BYTES:,} bytes. Split it into "
                   "smaller files with `extends`", source, (), 1, 1)


def _decoded(raw: bytes, source: str, error: type[LocatedError]) -> str:
    if len(raw) > MAX_BYTES:
        raise error(too_large(len(raw), source))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # the bytes before the first bad one are valid UTF-8: they give its line and column
        prefix = raw[:exc.start].decode("utf-8")
        line, column = text_position(prefix, len(prefix))
        raise error(Problem(f"file is not UTF-8 text: byte {raw[exc.start]:#04x} is not valid UTF-8 here "
                            f"({exc.reason}). Save the file as UTF-8", source, (), line, column)) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with the nesting depth bounded while composing (its composer recurses)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH + 1:  # the builder words the error; this only keeps the stack small
                raise _TooDeep(self.peek_event().start_mark)
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                return _Alias(super().compose_node(parent, index), mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Alias:
    """A use of `*name`: PyYAML gives the anchored node itself, which would locate every use at the anchor."""

    __slots__ = ("node", "start_mark")

    def __init__(self, node, start_mark):
        self.node = node
        self.start_mark = start_mark


def _target(node):
    return node.node if isinstance(node, _Alias) else node


class _TooDeep(Exception):
    def __init__(self, mark):
        self.mark = mark


def _too_deep(source: str, mark) -> Problem:
    return _problem(source, mark, f"document is nested deeper than {MAX_DEPTH} levels. Flatten it")


def parse_yaml(text: str | bytes, source: str = "<string>", *, error: type[LocatedError] = PolicyError) -> YamlDocument:
    """Parse one YAML document into plain data with positions; raise `error` (a `PolicyError`) on anything odd."""
    if isinstance(text, bytes):
        text = _decoded(text, source, error)
    if len(text) > MAX_BYTES:
        raise error(Problem(f"file is {len(text):,} characters long; files are limited to {MAX_BYTES:,}. Split "
                            "it into smaller files with `extends`", source, (), 1, 1))
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad is not None:  # PyYAML would say only "at character N"
        line, column = text_position(text, bad.start())
        raise error(Problem(f"invalid character {bad.group()!r} (code {ord(bad.group()):#x}): YAML does not allow "
                            "control characters. Remove it; policies are plain text", source, (), line, column))

    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except _TooDeep as exc:
            raise error(_too_deep(source, exc.mark)) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = one_line(str(exc.problem or exc.context or "invalid YAML"))
            if len(what) > 200:  # an undefined alias quotes its name
                what = what[:200] + "..."
            hint = "Fix the YAML syntax"
            if "\t" in str(exc) or "'\\t'" in str(exc):
                hint = "Indent with spaces; YAML does not allow tabs"
            raise error(_problem(source, mark, f"invalid YAML: {what}. {hint}")) from None
        except yaml.YAMLError as exc:
            raise error(_problem(source, None, f"invalid YAML: {quoted(str(exc))}. Fix the YAML syntax")) from None
        if root is None:
            raise error(_problem(source, None, "file is empty. A policy starts with `version: 1`"))
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
        self.doc.value_positions[path] = _mark(self.doc.source, node.start_mark)  # where an alias is used
        node = _target(node)

        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                self.fail(node, f"unsupported YAML tag {quoted(node.tag)}. Remove the tag")
            result: dict = {}
            for used_key, value_node in node.value:
                key_node = _target(used_key)
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.fail(key_node, "YAML merge keys (`<<`) are not supported. Use `extends` to reuse a policy")
                if not isinstance(key_node, yaml.ScalarNode):
                    self.fail(key_node, "mapping keys must be plain names. Use a name such as `unet`")
                key = self.scalar(key_node)
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    self.fail(key_node, f"mapping key {quoted(key)} is not a name. Quote it or use a name such as "
                                        "`unet`")
                key = str(key)
                if key in result:
                    first = self.doc.key_positions[path + (key,)]
                    self.fail(key_node, f"duplicate key {quoted(key)} (first at line {first.line}). Keep one of them")
                self.doc.key_positions[path + (key,)] = _mark(self.doc.source, used_key.start_mark)
                result[key] = self.build(value_node, path + (key,), depth + 1)
            return result

        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                self.fail(node, f"unsupported YAML tag {quoted(node.tag)}. Remove the tag")
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]

        return self.scalar(node)

    def scalar(self, node):
        if node.tag == _INT_TAG and len(node.value) > MAX_NUMBER_CHARS:
            # int() of 4,301 digits fails, and a long hex number loads but cannot be shown in a message
            self.fail(node, f"number {quoted(node.value)} is too long; policies take numbers of at most "
                            f"{MAX_NUMBER_CHARS} characters. Write a smaller number, or quote it if it is text")
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            self.fail(node, f"unsupported YAML tag {quoted(node.tag)} ({one_line(str(exc.problem))[:200]}). "
                            "Policies may use only plain YAML values: remove the tag")
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as exc:
            # PyYAML's scalar constructors assume the text fits the tag: `!!int abc`, `2024-13-01`
            self.fail(node, self.unreadable(node, exc))

    def unreadable(self, node, exc: Exception) -> str:
        what = _TAG_NAMES.get(node.tag, f"a {node.tag} value")
        implicit = node.style is None and self.loader.resolve(yaml.ScalarNode, node.value, (True, False)) == node.tag
        reason = f" ({one_line(str(exc))[:100]})" if node.tag == _TIMESTAMP_TAG and isinstance(exc, ValueError) else ""
        if implicit:
            hint = "Quote it to keep it as text"
            if node.tag == _TIMESTAMP_TAG:
                hint = "YAML reads an unquoted YYYY-MM-DD as a date. Quote it to keep it as text"
        else:
            short = node.tag.replace("tag:yaml.org,2002:", "!!")
            hint = f"Remove the `{one_line(short)[:60]}` tag, or write {what} after it"
        return f"{quoted(node.value)} is not {what}{reason}. {hint}"


_INT_TAG = "tag:yaml.org,2002:int"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_TAG_NAMES = {_INT_TAG: "an integer", "tag:yaml.org,2002:float": "a number",
              "tag:yaml.org,2002:bool": "true or false", _TIMESTAMP_TAG: "a valid date"}
