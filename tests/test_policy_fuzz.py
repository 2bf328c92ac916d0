"""Property: whatever a policy file holds, `load()` returns a Policy or raises a PolicyError whose every
problem is located (`file:line:col`), within a time and a memory bound.

The files are policies built from the real schema's keys and values (`Policy`, `QuantizationRules`, `Budget`
and each strategy's rule class), then mutated: wrong types, unknown keys, odd scalars, deep nesting, aliases,
tags, huge numbers, control characters, invalid UTF-8, and `extends` to a parent, a built-in or a cycle.

CI runs a few hundred examples with a fixed seed; set OFFLOADKIT_FUZZ_EXAMPLES=5000 for a longer hunt.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import time
import tracemalloc
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import offloadkit
from offloadkit.errors import MAX_LISTED, PolicyError
from offloadkit.policy.loading import builtin_policies
from offloadkit.policy.rules import RULES
from offloadkit.policy.schema import Budget, Policy, QuantizationRules

EXAMPLES = int(os.environ.get("OFFLOADKIT_FUZZ_EXAMPLES", "300"))
SECONDS_PER_EXAMPLE = 3.0  # generous: the CI machine is shared; a real hang or blow-up takes far longer
PEAK_BYTES_PER_EXAMPLE = 64 * 2**20

NAMES = ["unet", "vae", "text_encoder", "text_encoder_2", "transformer", "controlnet", "*", "a\nb", "UNet", "x" * 90]
SIZES = ["8GiB", "7.5 GB", "512MiB", 1, 2**40, "40%", "0GiB", "1" * 310, -5, True, "lots", 0.5]

# --- valid policies from the schema's own fields ------------------------------------------------------


def _from_annotation(annotation, name: str):
    """Values a field with this annotation takes (Literal choices, bools, small ints, names, sizes)."""
    if name in ("device_memory", "pinned_memory", "headroom", "resident"):
        return st.sampled_from(["auto", "8GiB", "40%", "512MiB", 3] if name != "device_memory" else SIZES[:4])
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _from_annotation(args[0], name)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_from_annotation(a, name) for a in args])
    if origin is list:
        return st.lists(st.sampled_from(NAMES[:6] + ["text_model.encoder.layers"]), max_size=3)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(0, 8)
    if annotation is str:
        return st.sampled_from(NAMES[:6] + ["auto", "cuda:1", "a policy"])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model(annotation)
    return st.just("auto")


def _model(model: type[BaseModel], fixed: dict | None = None):
    """Dicts of some of the model's fields (by their YAML names), each with a value of its type."""
    fields = {f.alias or n: _from_annotation(f.annotation, n) for n, f in model.model_fields.items()
              if n not in (fixed or {})}
    return st.fixed_dictionaries(fixed or {}, optional=fields)


def _rule():
    return st.one_of([_model(cls, {"strategy": st.just(name)}) for name, cls in RULES.items()])


def _quantization():
    choices = st.one_of(st.sampled_from(["auto", "keep-on-device", "offload", "refuse"]), _rule())
    return st.fixed_dictionaries({}, optional={k: choices for k in QuantizationRules.model_fields})


def _names():
    return st.one_of(st.just("auto"), st.lists(st.sampled_from(NAMES[:6]), max_size=4))


def _policies():
    return st.fixed_dictionaries({"version": st.just(1)}, optional={
        "name": st.text(max_size=12),
        "description": st.text(max_size=30),
        "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "gpu"]),
        "sequence": _names(),
        "exclude": _names(),
        "components": st.dictionaries(st.sampled_from(NAMES), _rule(), max_size=4),
        "quantization": _quantization(),
        "budget": _model(Budget),
        "pinned_memory": st.sampled_from(["auto", "8GiB", "40%", 2**30]),
    })


POLICIES = _policies()  # built once: building the strategy tree per draw took most of the time


# --- mutations ---------------------------------------------------------------------------------------

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30), st.floats(),
    st.text(max_size=20), st.sampled_from(SIZES), st.just(["unet", "unet"]), st.just({}),
    st.just({"strategy": "nope"}), st.just([[[[[]]]]]), st.just("x" * 5000),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def mutated_data(draw):
    """A policy with some values replaced by values of the wrong type, and some unknown keys."""
    data = draw(POLICIES)
    for _ in range(draw(st.integers(0, 3))):
        node, key = data, None
        for _ in range(draw(st.integers(0, 3))):  # walk down to some mapping or list
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) \
                if isinstance(node, list) else []
            containers = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
            if not containers:
                break
            key, node = draw(st.sampled_from(containers))
        if isinstance(node, dict):
            keys = list(node) + ["strategy", "versoin", "sequnce", "bnb_8bit", "on_exceed", "unknown"]
            node[draw(st.sampled_from(keys))] = copy.deepcopy(draw(ODD_VALUES))  # st.just shares its value
        elif isinstance(node, list):
            node[draw(st.integers(0, len(node) - 1))] = copy.deepcopy(draw(ODD_VALUES))
    return data


MUTATED = mutated_data()

# YAML text that PyYAML or Python find hard to read, inserted as values or as lines.
ODD_SCALARS = [
    "2024-13-01", "2001-02-30", "!!int abc", "!!int", "!!float a", "!!bool maybe", "!!timestamp nope",
    "!!binary zz", "!!set {a}", "!!omap [a]", "!!python/name:os.system", "!custom 1", "!!str", "!!null x",
    "!!map [a]", "!!seq {a: 1}", "!!merge x", "9" * 4301, "0x" + "f" * 3600, "1:" * 300 + "1", ".inf", "-.nan",
    "0o17", "0b101", "1_000", "1e999", "'" + "1" * 310 + "'", "*undefined", "&a 1", "&a [*a]", "[" * 493 + "]" * 493,
    "[" * 40 + "]" * 40, "{a: {b: {c: [1, {d: e}]}}}", "'unterminated", '"\\xZZ"', '"\\0"', "? [a]", "~", "",
    "yes", "no", "on", "NO", "=", "<<", "- a", "|\n  text\n", ">-\n  folded\n", "\t1", "a: b: c",
]
ODD_LINES = [
    "<<: *a", "a: &a {strategy: model}", "b: [*a, *a, *a]", "---", "...", "%YAML 1.1", "%TAG ! tag:x,2000:",
    "? [a, b]\n: 1", "\tversion: 1", "version: 1", "version: 2", "  indented: 1", "components:\n  unet: *a",
    "extends: parent.yaml", "extends: cycle.yaml", "extends: diffusers-default", "extends: /dev/zero",
    "extends: " + "x" * 300, "extends: [a]", "extends: ''", "# comment", "- item", "key with spaces: 1",
]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\x01", b"\x1b[31m",
             b"\x7f", b"\xc2\x85", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"\r", b"\r\n", b"\xe9"]


@st.composite
def policy_bytes(draw):
    """The bytes of a policy file: dumped data, then text and byte edits."""
    data = draw(st.one_of(POLICIES, MUTATED))
    text = yaml.safe_dump(data, sort_keys=draw(st.booleans()), allow_unicode=draw(st.booleans()),
                          default_flow_style=draw(st.sampled_from([False, True, None])))
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(lines)))
        if draw(st.booleans()) and where < len(lines) and ": " in lines[where]:
            head = lines[where].split(": ", 1)[0]  # replace a value
            lines[where] = f"{head}: {draw(st.sampled_from(ODD_SCALARS))}"
        else:
            lines.insert(where, draw(st.sampled_from(ODD_LINES + [f"k{where}: {s}" for s in ODD_SCALARS[:8]])))
    raw = "\n".join(lines).encode("utf-8") + b"\n"
    if draw(st.integers(0, 3)) == 0:  # aliases of a long string, many times (PyYAML scans 100 KB in seconds
        # under tracemalloc: the 200 KB case is a test of its own in test_loading)
        raw += b"big: &big '" + b"x" * draw(st.sampled_from([10, 5_000])) + b"'\nexclude: [" \
            + b", ".join([b"*big"] * draw(st.integers(1, 500))) + b"]\n"
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(BAD_BYTES)) + raw[at:]
    if draw(st.integers(0, 9)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


# What `extends: parent.yaml` finds (a generated parent now and then: the edits above, one file up).
PARENTS = [None, b"version: 1\ncomponents: {vae: {strategy: resident}}\n", b"version: 1\nsequence: [unet, vae]\n",
           b"version: 1\ndevice: gpu\n", b"version: 1\nextends: policy.yaml\n", b"version: 1\nextends: parent.yaml\n",
           b"version: 1\nextends: vae-resident\nname: \xff\n", b"", b"[1, 2]\n", b"version: 1\nname: !!int x\n"]


# --- the property ------------------------------------------------------------------------------------

_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _line_count(path: Path) -> int:
    return len(_LINE_BREAK.split(path.read_bytes().decode("utf-8", errors="replace"))) + 1


def check_load(path: Path):
    """Load the file; fail on any other exception, an unlocated problem, or too much time or memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        policy = offloadkit.load(str(path))
    except PolicyError as exc:
        assert exc.problems, "a PolicyError without problems"
        lines = {}
        for problem in exc.problems:
            assert isinstance(problem.line, int) and problem.line >= 1, problem
            assert isinstance(problem.column, int) and problem.column >= 1, problem
            line = str(problem)
            assert line.startswith(f"{problem.source}:{problem.line}:{problem.column}"), line
            assert "\n" not in line and len(line) < 2_500, line
            assert ". " in problem.message or problem.message.endswith("."), line  # says what to do
            if problem.source not in lines:
                source = Path(problem.source)
                lines[problem.source] = _line_count(source) if source.is_file() else None
            if lines[problem.source] is not None:
                assert problem.line <= lines[problem.source], line
        assert str(exc).count("\n") <= MAX_LISTED
    else:
        assert isinstance(policy, Policy)
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < SECONDS_PER_EXAMPLE, f"{elapsed:.1f} s"
    assert peak < PEAK_BYTES_PER_EXAMPLE, f"{peak / 2**20:.0f} MiB"


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@FUZZ_SETTINGS
@given(raw=policy_bytes(), parent=st.one_of(st.sampled_from(PARENTS), policy_bytes()),
       cycle=st.sampled_from([None, b"version: 1\nextends: policy.yaml\n", b"version: 1\nextends: cycle.yaml\n"]))
def test_load_returns_a_policy_or_a_located_error(folder, raw, parent, cycle):
    (folder / "policy.yaml").write_bytes(raw)
    for name, content in (("parent.yaml", parent), ("cycle.yaml", cycle)):
        path = folder / name
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
    check_load(folder / "policy.yaml")


def test_the_generator_speaks_the_schemas_language(folder):
    # valid policies must be among those generated, or the property above would only ever see errors
    outcomes = []

    @settings(FUZZ_SETTINGS, max_examples=100)
    @given(data=POLICIES)
    def run(data):
        assert set(data) <= set(Policy.model_fields)
        path = folder / "valid.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            outcomes.append(isinstance(offloadkit.load(str(path)), Policy))
        except PolicyError:
            outcomes.append(False)

    run()
    assert sum(outcomes) >= len(outcomes) // 5, f"only {sum(outcomes)} of {len(outcomes)} generated policies load"
