import pytest

from offloadkit.errors import PolicyError
from offloadkit.policy.yaml_source import MAX_DEPTH, MAX_NODES, parse_yaml


def test_positions_of_keys_and_values():
    doc = parse_yaml("version: 1\ncomponents:\n  vae: {strategy: resident}\n", "p.yaml")
    assert doc.data == {"version": 1, "components": {"vae": {"strategy": "resident"}}}
    vae_key = doc.key_positions[("components", "vae")]
    assert (vae_key.line, vae_key.column) == (3, 3)
    strategy_value = doc.value_positions[("components", "vae", "strategy")]
    assert (strategy_value.line, strategy_value.column) == (3, 19)


def test_position_falls_back_to_nearest_parent():
    doc = parse_yaml("version: 1\ncomponents:\n  vae: {strategy: resident}\n", "p.yaml")
    pos = doc.position(("components", "vae", "missing"))
    assert (pos.line, pos.column) == (3, 8)


@pytest.mark.parametrize("text, needle", [
    ("version: !!python/name:os.system\n", "unsupported YAML tag"),
    ("version: !custom 1\n", "unsupported YAML tag"),
    ("a: 1\n---\nb: 2\n", "invalid YAML"),
    ("version: [1, 2\n", "invalid YAML"),
    ("", "file is empty"),
    ("# only a comment\n", "file is empty"),
])
def test_refused_documents(text, needle):
    with pytest.raises(PolicyError) as info:
        parse_yaml(text, "p.yaml")
    assert needle in str(info.value)
    assert str(info.value).startswith("p.yaml")


def test_deeply_nested_document_is_refused():
    text = "version: 1\nx: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n"
    with pytest.raises(PolicyError, match="nested deeper"):
        parse_yaml(text, "deep.yaml")


def test_alias_bomb_is_refused():
    # each level doubles the expanded size; the node count stops it early
    lines = ["a0: &a0 [x, x]"]
    for i in range(1, 25):
        lines.append(f"a{i}: &a{i} [*a{i-1}, *a{i-1}]")
    with pytest.raises(PolicyError, match=f"more than {MAX_NODES:,} nodes"):
        parse_yaml("\n".join(lines) + "\n", "bomb.yaml")


def test_huge_file_is_refused():
    with pytest.raises(PolicyError, match="limited to"):
        parse_yaml("version: 1\n" + "#" * 2_000_000 + "\n", "huge.yaml")


def test_non_utf8_is_refused():
    with pytest.raises(PolicyError, match="not UTF-8"):
        parse_yaml(b"version: 1\nname: \xff\xfe\n", "bin.yaml")


def test_non_string_keys_are_refused():
    with pytest.raises(PolicyError, match="mapping keys must be plain names"):
        parse_yaml("? [a, b]\n: 1\n", "k.yaml")


# --- issue 14: every odd input is a located PolicyError ------------------------------------------

def assert_located(error: PolicyError, source: str = "p.yaml"):
    for problem in error.problems:
        assert problem.source == source and problem.line is not None and problem.column is not None, problem
        assert str(problem).startswith(f"{source}:{problem.line}:{problem.column}")
        assert "\n" not in str(problem)


@pytest.mark.parametrize("text, column, needle", [
    ("description: 2024-13-01", 14, "'2024-13-01' is not a valid date (month must be in 1..12). YAML reads an "
                                    "unquoted YYYY-MM-DD as a date. Quote it"),
    ("name: 2001-02-30", 7, "'2001-02-30' is not a valid date (day is out of range for month)"),
    ("name: !!int abc", 7, "'abc' is not an integer. Remove the `!!int` tag"),
    ("name: !!int", 7, "'' is not an integer"),
    ("name: !!float a", 7, "'a' is not a number"),
    ("name: !!bool maybe", 7, "'maybe' is not true or false"),
    ("name: !!timestamp nope", 7, "'nope' is not a valid date. Remove the `!!timestamp` tag"),
])
def test_scalars_pyyaml_cannot_construct_are_located(text, column, needle):
    with pytest.raises(PolicyError) as info:
        parse_yaml(f"version: 1\n{text}\n", "p.yaml")
    assert_located(info.value)
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (2, column)
    assert needle in problem.message


@pytest.mark.parametrize("number", ["9" * 4301, "0x" + "f" * 3600, "1:" * 2000 + "1"])
def test_integers_too_long_to_show_are_refused(number):
    with pytest.raises(PolicyError, match="is too long; policies take numbers of at most") as info:
        parse_yaml(f"version: 1\nname: {number}\n", "p.yaml")
    assert_located(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("levels", [MAX_DEPTH + 5, 493, 20_000])
def test_deep_flow_nesting_is_refused_before_the_stack_overflows(levels):
    with pytest.raises(PolicyError, match=f"nested deeper than {MAX_DEPTH} levels") as info:
        parse_yaml("version: 1\nname: " + "[" * levels + "]" * levels + "\n", "p.yaml")
    assert_located(info.value)


def test_deep_block_nesting_is_refused():
    text = "version: 1\n" + "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v\n"
    with pytest.raises(PolicyError, match="nested deeper") as info:
        parse_yaml(text, "p.yaml")
    assert_located(info.value)


@pytest.mark.parametrize("text, where", [
    ("version: 1\nname: ab\x01c\n", (2, 9)),
    ("version: 1\r\nname: x\r\n  \x7f\n", (3, 3)),
    ("\ufeffversion: \x00\n", (1, 10)),
])
def test_control_characters_are_located_by_line_and_column(text, where):
    with pytest.raises(PolicyError, match="invalid character") as info:
        parse_yaml(text, "p.yaml")
    assert_located(info.value)
    assert (info.value.problems[0].line, info.value.problems[0].column) == where


@pytest.mark.parametrize("raw, where", [
    (b"version: 1\nname: \xff\xfe\n", (2, 7)),
    (b"version: 1\nname: \xc3\xa9t\xc3\xa9 \xe2\x82\n", (2, 11)),  # columns count characters, not bytes
    (b"\xc0", (1, 1)),
])
def test_non_utf8_bytes_are_located_by_line_and_column(raw, where):
    with pytest.raises(PolicyError, match="not UTF-8") as info:
        parse_yaml(raw, "p.yaml")
    assert_located(info.value)
    assert (info.value.problems[0].line, info.value.problems[0].column) == where


def test_whole_file_problems_point_at_its_start():
    for text in ("", "# only a comment\n", "version: 1\n" + "#" * 2_000_000 + "\n"):
        with pytest.raises(PolicyError) as info:
            parse_yaml(text, "p.yaml")
        assert_located(info.value)


def test_an_alias_is_located_where_it_is_used():
    doc = parse_yaml("version: 1\nname: &n vae\nexclude: [*n, *n]\n", "p.yaml")
    assert doc.data["exclude"] == ["vae", "vae"]
    assert [(doc.value_positions[("exclude", i)].line, doc.value_positions[("exclude", i)].column)
            for i in (0, 1)] == [(3, 11), (3, 15)]


def test_a_recursive_alias_is_refused():
    with pytest.raises(PolicyError, match="nested deeper") as info:
        parse_yaml("a: &a [*a]\n", "p.yaml")
    assert_located(info.value)
