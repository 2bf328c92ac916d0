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
