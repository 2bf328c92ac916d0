import os
import re
import time
import tracemalloc
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


# --- issue 14: odd inputs give located problems that say what to do ------------------------------

def located(error: PolicyError) -> list:
    for problem in error.problems:
        assert problem.line is not None and problem.column is not None, problem
        assert "\n" not in str(problem)
    return list(error.problems)


def load_text(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return offloadkit.load(str(path))


@pytest.mark.parametrize("budget, needle", [
    ("'" + "1" * 310 + "'", "(310 characters) is too large to be a size. Write e.g. '8GiB'"),
    ("-5", "a size must be positive, not -5. Write a number of bytes above 0"),
    ("0GiB", "a size must be positive, not '0GiB'. Write a size above 0"),
    ("true", "expected a size such as '8GiB', not True. Write a number of bytes"),
])
def test_budget_sizes_say_what_is_wrong_and_what_to_do(tmp_path, budget, needle):
    with pytest.raises(PolicyError) as info:
        load_text(tmp_path, f"version: 1\nbudget: {{device_memory: {budget}}}\n")
    (problem,) = located(info.value)
    assert problem.dotted_path == "budget.device_memory" and needle in problem.message


def test_a_bool_option_says_what_to_write(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_text(tmp_path, "version: 1\ncomponents: {unet: {strategy: model, keep_on_device: x}}\n")
    assert "must be true or false, not 'x'. Write `true` or `false`" in str(info.value)


def test_a_name_with_a_newline_stays_on_one_line(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_text(tmp_path, 'version: 1\ncomponents: {"a\\nb": {strategy: nope}}\n')
    (problem,) = located(info.value)
    assert str(problem).count("\n") == 0 and "components.'a\\nb': unknown strategy 'nope'" in str(problem)


def test_an_aliased_long_string_gives_short_bounded_messages(tmp_path):
    big = "x" * 200_000
    text = "version: 1\nname: &s '" + big + "'\nexclude:\n" + "  - *s\n" * 5000
    started = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        load_text(tmp_path, text)
    assert time.perf_counter() - started < 5
    problems = located(info.value)
    assert len(problems) == 4999 and all(len(p.message) < 200 for p in problems)
    assert problems[0].path == ("exclude", 1) and problems[0].line == 5  # the alias, not the anchor on line 2
    message = str(info.value)
    assert len(message) < 50_000 and message.endswith("... and 4,949 more problems. Fix these and check again "
                                                      "to see the rest")


def test_many_problems_are_deduplicated_in_linear_time():
    components = {f"c{i}": {"strategy": "nope"} for i in range(15_000)}
    started = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": 1, "components": components})
    assert len(info.value.problems) == 15_000
    assert time.perf_counter() - started < 8  # quadratic de-duplication took minutes here


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "sparse.yaml"
    with path.open("wb") as file:
        file.truncate(64_000_000)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(PolicyError, match="file is 64,000,000 bytes long; files are limited to 1,000,000") \
                as info:
            offloadkit.load(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000
    assert located(info.value)[0].line == 1


@pytest.mark.skipif(not os.path.exists("/dev/zero") or not hasattr(os, "mkfifo"), reason="needs POSIX files")
def test_extends_a_device_or_a_pipe_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for target in ("/dev/zero", "fifo"):
        with pytest.raises(PolicyError) as info:
            load_text(tmp_path, f"version: 1\nextends: {target}\n")
        (problem,) = located(info.value)
        assert f"'{target}' is not a regular file" in problem.message and (problem.line, problem.column) == (2, 10)
    with pytest.raises(PolicyError, match="is not a regular file"):
        offloadkit.load(str(tmp_path / "fifo"))


def test_a_cycle_is_located_in_the_file_asked_about_too(tmp_path):
    (tmp_path / "cycle-a.yaml").write_text("version: 1\nextends: cycle-b.yaml\n")
    (tmp_path / "cycle-b.yaml").write_text("version: 1\n\nextends: cycle-a.yaml\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.load(str(tmp_path / "cycle-a.yaml"))
    problems = located(info.value)
    assert [(Path(p.source).name, p.line) for p in problems] == [("cycle-a.yaml", 2), ("cycle-b.yaml", 3)]
    assert all("makes a cycle (cycle-a.yaml -> cycle-b.yaml -> cycle-a.yaml)" in p.message for p in problems)


def test_the_extends_chain_is_limited(tmp_path):
    from offloadkit.policy.schema import MAX_EXTENDS

    for i in range(1000):
        (tmp_path / f"p{i}.yaml").write_text(f"version: 1\nextends: p{i + 1}.yaml\n")
    (tmp_path / "p1000.yaml").write_text("version: 1\n")
    with pytest.raises(PolicyError, match=f"`extends` chain is longer than {MAX_EXTENDS} files") as info:
        offloadkit.load(str(tmp_path / "p0.yaml"))
    problems = located(info.value)
    assert [Path(p.source).name for p in problems] == ["p0.yaml", f"p{MAX_EXTENDS}.yaml"]
    # a chain of MAX_EXTENDS parents is fine
    assert offloadkit.load(str(tmp_path / f"p{1000 - MAX_EXTENDS}.yaml")).version == 1


def test_problems_in_a_builtin_parent_name_the_file_asked_about(tmp_path):
    from offloadkit.policy.loading import located_problem

    path = tmp_path / "child.yaml"
    path.write_text("version: 1\nextends: controlnet-resident\n")
    policy = offloadkit.load(str(path))
    problem = located_problem(policy, ("components", "controlnet"), "no such component. Remove it")
    assert problem.source == "<builtin:controlnet-resident>" and problem.line is not None
    assert f"(inherited through `extends` at {path}:2:10; override it in {path})" in problem.message


def test_problems_in_a_parent_file_name_the_file_asked_about(tmp_path):
    (tmp_path / "base.yaml").write_text("version: 1\nname: !!int x\n")
    (tmp_path / "child.yaml").write_text("version: 1\nextends: base.yaml\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.load(str(tmp_path / "child.yaml"))
    (problem,) = located(info.value)
    assert problem.source.endswith("base.yaml") and (problem.line, problem.column) == (2, 7)
    assert f"inherited through `extends` at {tmp_path / 'child.yaml'}:2:10" in problem.message


# --- issue 15: messages in offloadkit's words, every typo reported, the right kind of file -------

def test_a_quoted_version_says_it_must_be_a_number():
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": "1"})
    (problem,) = info.value.problems
    assert problem.message == "must be a number, not the string '1'. Write `version: 1` without quotes"
    with pytest.raises(PolicyError, match="unsupported version 2. This offloadkit reads `version: 1`"):
        offloadkit.load({"version": 2})


def _bad_documents():
    """(loader, document) pairs: every field of every policy and hardware-profile model given wrong values."""
    from offloadkit.policy.rules import RULES
    from offloadkit.policy.schema import Budget, Policy, QuantizationRules
    from offloadkit.prediction.hardware import HardwareProfile, Measurement, load_hardware

    profile = {"version": 1, "name": "box", "device": "cuda", "device_memory": "24GiB", "host_memory": "64GiB",
               "h2d_pinned": "25GB/s", "h2d_pageable": "12GB/s", "disk_read": "3GB/s"}
    places = [(offloadkit.load, Policy, lambda f, v: {"version": 1, f: v}),
              (offloadkit.load, QuantizationRules, lambda f, v: {"version": 1, "quantization": {f: v}}),
              (offloadkit.load, Budget, lambda f, v: {"version": 1, "budget": {"device_memory": "8GiB", f: v}}),
              (load_hardware, HardwareProfile, lambda f, v: {**profile, f: v}),
              (load_hardware, Measurement,
               lambda f, v: {**profile, "measured": {"date": "2025-06-01T12:00:00Z", f: v}})]
    for name, rule in RULES.items():
        places.append((offloadkit.load, rule,
                       lambda f, v, name=name: {"version": 1, "components": {"unet": {"strategy": name, f: v}}}))
    values = ["x", "1", 1.5, -1, 0, 2, 10**30, True, None, float("nan"), [1], {"a": 1}, "2025-06-01T12:00:00"]
    for loader, model, document in places:
        for field in model.model_fields:
            for value in values:
                yield loader, model, document(field, value)


def test_no_pydantic_wording_reaches_a_message():
    from pydantic import ValidationError

    from offloadkit.errors import LocatedError
    from offloadkit.policy.documents import WORDED
    from offloadkit.policy.schema import Policy
    from offloadkit.prediction.hardware import HardwareProfile

    met, messages = set(), []
    for loader, _, data in _bad_documents():
        try:
            (Policy if loader is offloadkit.load else HardwareProfile).model_validate(data)
        except ValidationError as exc:
            met.update(e["type"] for e in exc.errors())
        try:
            loader(data)
        except LocatedError as exc:
            messages.extend(p.message for p in exc.problems)
    # the walk reaches the kinds of error a policy can produce, and each is worded by offloadkit itself
    assert {"int_type", "int_parsing", "int_from_float", "float_parsing", "bool_parsing", "string_type",
            "list_type", "tuple_type", "literal_error", "greater_than", "greater_than_equal", "less_than_equal",
            "extra_forbidden", "value_error", "timezone_aware"} <= met
    assert met <= WORDED, f"pydantic error types without offloadkit wording: {sorted(met - WORDED)}"
    leaks = ("Input should", "Fix the value", "Value error", "Field required", "Extra inputs", "unable to parse",
             "unable to interpret", "valid integer", "valid boolean", "pydantic")
    bad = sorted({m for m in messages if any(leak in m for leak in leaks)})
    assert len(messages) > 1000 and not bad, bad[:10]


@pytest.mark.parametrize("option, value, needle", [
    ("num_blocks_per_group", "x", "must be a whole number, not 'x'. Write a number without quotes, e.g. `2`"),
    ("num_blocks_per_group", 1.5, "must be a whole number, not 1.5. Write `1` or `2`"),
    ("num_blocks_per_group", 0, "must be at least 1, not 0. Write 1 or more"),
    ("block_modules", "down_blocks", "must be a list, not 'down_blocks'. Write a list in brackets"),
    ("use_stream", "x", "must be true or false, not 'x'. Write `true` or `false`"),
    ("offload_type", "leaf", "unknown value 'leaf'. Did you mean 'leaf_level'?"),
])
def test_option_errors_say_what_to_write(option, value, needle):
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "group", option: value}}})
    (problem,) = info.value.problems
    assert problem.dotted_path == f"components.unet.{option}" and needle in problem.message, problem.message


def test_hardware_bounds_say_what_to_write():
    from offloadkit.errors import HardwareError
    from offloadkit.prediction.hardware import load_hardware

    profile = {"version": 1, "name": "box", "device": "cuda", "device_memory": "24GiB", "host_memory": "64GiB",
               "h2d_pinned": "25GB/s", "h2d_pageable": "12GB/s", "disk_read": "3GB/s", "compute_efficiency": 2}
    with pytest.raises(HardwareError) as info:
        load_hardware(profile)
    (problem,) = info.value.problems
    assert problem.message == "must be at most 1, not 2. Write 1 or less"


@pytest.mark.parametrize("rule", ["{strategy: modle, trasnfer: pinned, prefetc: true}",
                                  "{trasnfer: pinned, prefetc: true}",
                                  "{strategy: model, trasnfer: pinned, prefetc: true}"])
def test_every_unknown_key_of_a_rule_is_reported_even_beside_a_bad_strategy(tmp_path, rule):
    with pytest.raises(PolicyError) as info:
        load_text(tmp_path, f"version: 1\ncomponents:\n  unet: {rule}\n")
    problems = {p.dotted_path: p for p in located(info.value)}
    for key, hint in (("trasnfer", "Did you mean 'transfer'?"), ("prefetc", "Did you mean 'prefetch'?")):
        problem = problems[f"components.unet.{key}"]
        assert problem.line == 3 and problem.column == 9 + rule.index(key) and hint in problem.message
    if "strategy: model," not in rule:  # the strategy's own problem is still there
        assert "strategy" in problems["components.unet"].message


def test_a_rule_key_another_strategy_has_is_left_to_the_strategy_error():
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "gruop", "offload_type": "leaf_level"}}})
    assert [p.dotted_path for p in info.value.problems] == ["components.unet"]


ROOT = Path(__file__).resolve().parent.parent


def test_a_hardware_profile_given_as_a_policy_is_named_once(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(PolicyError) as info:
        offloadkit.load("hardware/rtx-4060-8gb.yaml")
    (problem,) = info.value.problems
    assert problem.source == "hardware/rtx-4060-8gb.yaml" and problem.line is not None
    assert problem.message.startswith("this is a hardware profile, not a policy (it has `nominal`, "
                                      "`device_memory`, `host_memory`, ...). Pass it with --hardware")


def test_a_policy_with_one_stray_profile_key_keeps_its_unknown_key_error():
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": 1, "device_memory": "8GiB"})
    (problem,) = info.value.problems
    assert problem.message.startswith("unknown key 'device_memory'")
    with pytest.raises(PolicyError, match="unknown key 'h2d_pinned'"):  # a policy's own key: not a profile
        offloadkit.load({"version": 1, "components": {}, "device_memory": "8GiB", "h2d_pinned": "1GB/s"})


def test_a_policy_given_as_a_hardware_profile_is_named_once(monkeypatch):
    from offloadkit.errors import HardwareError
    from offloadkit.prediction.hardware import load_hardware

    monkeypatch.chdir(ROOT)
    with pytest.raises(HardwareError) as info:
        load_hardware("policies/sequential.yaml")
    (problem,) = info.value.problems
    assert problem.source == "policies/sequential.yaml" and problem.line is not None
    assert problem.message.startswith("this is a policy, not a hardware profile (it has `sequence`")
    assert "as --hardware" in problem.message


def test_the_profile_key_lists_match_the_models():
    from offloadkit.policy.loading import HARDWARE_PROFILE_KEYS, POLICY_ONLY_KEYS
    from offloadkit.policy.schema import Policy
    from offloadkit.prediction.hardware import HardwareProfile

    assert set(HARDWARE_PROFILE_KEYS) == set(HardwareProfile.model_fields) - set(Policy.model_fields)
    assert set(POLICY_ONLY_KEYS) == set(Policy.model_fields) - set(HardwareProfile.model_fields)


def test_paths_in_messages_are_normalised_and_stay_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "team").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "team" / "base.yaml").write_text("version: 1\ndevice: gpu\n")
    (tmp_path / "other" / "child.yaml").write_text("version: 1\nextends: ../other/../team/base.yaml\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.load("other/../team/base.yaml")
    assert str(info.value).startswith("team/base.yaml:2:9 device: invalid device 'gpu'")
    with pytest.raises(PolicyError) as info:
        offloadkit.load("./other/../other/child.yaml")
    assert str(info.value).startswith("team/base.yaml:2:9 device:")
    assert "(inherited through `extends` at other/child.yaml:2:10;" in str(info.value)
    with pytest.raises(PolicyError) as info:  # absolute stays absolute, normalised
        offloadkit.load(str(tmp_path / "other" / ".." / "team" / "base.yaml"))
    assert str(info.value).startswith(f"{tmp_path / 'team' / 'base.yaml'}:2:9 device:")


def test_a_path_through_a_missing_folder_says_which(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "base.yaml").write_text("version: 1\n")
    (tmp_path / "child.yaml").write_text("version: 1\nextends: nope/../team/base.yaml\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.load("child.yaml")
    (problem,) = located(info.value)
    assert problem.message == ("policy file 'nope/../team/base.yaml' not found: it goes up (`..`) out of 'nope', "
                               "which does not exist. Write 'team/base.yaml'")
    (tmp_path / "team" / "child.yaml").write_text("version: 1\nextends: missing.yaml\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.load("team/../team/child.yaml")
    assert str(info.value) == ("team/child.yaml:2:10 extends: policy file 'missing.yaml' not found. Check the path "
                               f"(relative paths start from {tmp_path / 'team'})")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_path_through_a_symlinked_folder_shows_where_the_file_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "p.yaml").write_text("version: 1\ndevice: gpu\n")
    os.symlink(tmp_path / "deep" / "er", tmp_path / "link")
    with pytest.raises(PolicyError) as info:  # `link/..` is deep/, not here: a lexical `p.yaml` would mislead
        offloadkit.load("link/../p.yaml")
    assert str(info.value).startswith("deep/p.yaml:2:9 device:")
