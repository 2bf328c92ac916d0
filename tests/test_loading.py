import os
import re
from pathlib import Path

import pytest

import offloadkit
from offloadkit.errors import PolicyError

FIXTURES = Path(__file__).parent / "fixtures"
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [m.group(1) for line in lines if (m := re.match(r"# expect: (.*)$", line))]


def test_fixture_files_exist():
    assert len(INVALID) >= 20
    for path in INVALID:
        assert expectations(path), f"{path.name} has no '# expect:' lines"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_policy_errors(path, monkeypatch):
    monkeypatch.chdir(FIXTURES.parent.parent)
    shown = os.path.relpath(path)
    with pytest.raises(PolicyError) as info:
        offloadkit.load(shown)
    message = str(info.value)
    for expected in expectations(path):
        assert expected.replace("{file}", shown) in message, message


def test_all_errors_of_a_file_are_reported_at_once():
    with pytest.raises(PolicyError) as info:
        offloadkit.load(str(FIXTURES / "invalid" / "many_errors.yaml"))
    assert len(info.value.problems) == 3
    assert [p.dotted_path for p in info.value.problems] == ["device", "exclud", "components.unet"]


def test_policy_error_is_a_value_error():
    with pytest.raises(ValueError):
        offloadkit.load({"version": 1, "device": "gpu"})


def test_load_builtin_and_dict_and_policy():
    policy = offloadkit.load("diffusers-default")
    assert policy.name == "diffusers-default"
    assert policy.sequence == "auto" and policy.exclude == "auto"
    assert offloadkit.load(policy) is policy
    from_dict = offloadkit.load({"version": 1, "components": {"vae": {"strategy": "resident"}}})
    assert from_dict.components["vae"].strategy == "resident"


def test_dict_errors_name_the_path():
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": 1, "components": {"vae": {"strategy": "nope"}}})
    assert str(info.value).startswith("<dict> components.vae: unknown strategy 'nope'")


def test_unknown_builtin_suggests_closest():
    with pytest.raises(PolicyError, match="Did you mean 'diffusers-default'"):
        offloadkit.load("diffusers-defaul")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        offloadkit.load(str(tmp_path / "nope.yaml"))


def test_extends_merges_child_over_parent(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "version: 1\nname: base\ndevice: cuda:1\nsequence: [text_encoder, unet]\n"
        "components:\n  vae: {strategy: resident}\n  unet: {strategy: model}\n"
        "quantization: {bnb_8bit: refuse, bnb_4bit: offload}\n")
    (tmp_path / "child.yaml").write_text(
        "version: 1\nextends: base.yaml\ndevice: cpu\n"
        "components:\n  vae: {strategy: skip}\nquantization: {bnb_8bit: offload}\n")
    policy = offloadkit.load(str(tmp_path / "child.yaml"))
    assert policy.device == "cpu"                                # child wins
    assert policy.sequence == ["text_encoder", "unet"]           # inherited
    assert policy.components["vae"].strategy == "skip"           # per-component override
    assert policy.components["unet"].strategy == "model"         # other components kept
    assert policy.quantization.bnb_8bit == "offload"             # per-key override
    assert policy.quantization.bnb_4bit == "offload"             # inherited
    assert policy.name is None                                   # names are not inherited


def test_extends_errors_point_into_the_parent_file(tmp_path):
    (tmp_path / "base.yaml").write_text("version: 1\ndevice: gpu\n")
    (tmp_path / "child.yaml").write_text("version: 1\nextends: base.yaml\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.load(str(tmp_path / "child.yaml"))
    assert "base.yaml:2:9 device: invalid device 'gpu'" in str(info.value)


def test_extends_builtin_chain():
    policy = offloadkit.load("vae-resident")
    assert policy.components["vae"].strategy == "resident"
    assert policy.quantization.bnb_8bit == "auto"


def test_extends_self_cycle(tmp_path):
    (tmp_path / "me.yaml").write_text("version: 1\nextends: me.yaml\n")
    with pytest.raises(PolicyError, match="makes a cycle"):
        offloadkit.load(str(tmp_path / "me.yaml"))


def test_loading_does_not_touch_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    text = "version: 1\nsequnce: auto\n"
    path.write_text(text)
    with pytest.raises(PolicyError):
        offloadkit.load(str(path))
    assert path.read_text() == text


def test_bad_source_type():
    with pytest.raises(PolicyError, match="cannot load a policy from int"):
        offloadkit.load(42)
