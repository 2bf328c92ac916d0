"""The `offloadkit` command: exit codes, messages, and staying light (no torch) where promised."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offloadkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILES = sorted((ROOT / "policies").glob("*.yaml")) + sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_policies_and_examples():
    assert len(list((ROOT / "policies").glob("*.yaml"))) >= 3
    assert len(list((ROOT / "examples").glob("*.yaml"))) >= 1


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_validate_every_shipped_policy(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# yaml-language-server: $schema=") and "policy.schema.json" in first_line


def test_validate_invalid_exits_1_and_reports_every_file(capsys):
    bad = ROOT / "tests" / "fixtures" / "invalid" / "bad_device.yaml"
    also_bad = ROOT / "tests" / "fixtures" / "invalid" / "unknown_top_key.yaml"
    good = ROOT / "policies" / "diffusers-default.yaml"
    assert main(["validate", str(bad), str(good), str(also_bad)]) == 1
    captured = capsys.readouterr()
    assert "invalid device 'cuda1'" in captured.err
    assert "unknown key 'sequnce'" in captured.err
    assert "diffusers-default.yaml: valid" in captured.out
    assert "Traceback" not in captured.err


def test_version_names_offloadkit_and_the_libraries_it_runs_on(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    from offloadkit import __version__

    out = capsys.readouterr().out
    assert out.startswith(f"offloadkit {__version__} (") and out.count("\n") == 1
    assert f"torch {version('torch')}" in out and f"diffusers {version('diffusers')}" in out


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_validate_with_pipeline_checks_names(capsys):
    fixtures = ROOT / "tests" / "fixtures" / "invalid_for_pipeline"
    for path in sorted(fixtures.glob("*.yaml")):
        text = path.read_text()
        pipeline = text.split("# pipeline: ", 1)[1].split("\n", 1)[0]
        assert main(["validate", str(path), "--pipeline", pipeline]) == 1, path.name
        err = capsys.readouterr().err
        for line in text.splitlines():
            if line.startswith("# expect: "):
                assert line[len("# expect: "):].replace("{file}", str(path)) in err, err
    assert main(["validate", str(ROOT / "examples" / "sdxl-8gb.yaml"), "--pipeline",
                 "StableDiffusionXLPipeline"]) == 0


def test_validate_and_schema_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from offloadkit.cli import main\n"
        f"assert main(['validate', {str(ROOT / 'examples' / 'sdxl-8gb.yaml')!r}, 'diffusers-default']) == 0\n"
        f"assert main(['validate', {str(ROOT / 'tests' / 'fixtures' / 'invalid' / 'many_errors.yaml')!r}]) == 1\n"
        f"assert main(['schema', '--check', '--output', {str(ROOT / 'schemas' / 'policy.schema.json')!r}]) == 0\n"
        f"assert main(['schema', '--output', {str(tmp_path / 's.json')!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'diffusers', 'accelerate', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('light')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "light" in result.stdout


def test_schema_check_detects_stale_and_missing(tmp_path, capsys):
    target = tmp_path / "policy.schema.json"
    assert main(["schema", "--check", "--output", str(target)]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["schema", "--output", str(target)]) == 0
    assert main(["schema", "--check", "--output", str(target)]) == 0
    target.write_text(target.read_text().replace('"version"', '"versoin"'))
    assert main(["schema", "--check", "--output", str(target)]) == 1
    assert "stale" in capsys.readouterr().err


def test_committed_schema_is_current():
    assert main(["schema", "--check", "--output", str(ROOT / "schemas" / "policy.schema.json")]) == 0


def test_schema_describes_the_policy():
    schema = json.loads((ROOT / "schemas" / "policy.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["version"]
    assert set(schema["properties"]) == {"version", "name", "description", "extends", "device", "sequence",
                                         "exclude", "components", "quantization", "budget", "pinned_memory"}


def test_list_shows_builtins(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("diffusers-default", "vae-resident", "controlnet-resident", "sdxl", "flux1-dev",
                 "wan21-t2v-14b", "rtx-4090-24gb", "h100-80gb"):
        assert f"  {name} " in out
    assert "FluxPipeline" in out


def test_explain_prints_a_plan(capsys):
    assert main(["explain", "vae-resident", "--pipeline", "StableDiffusionXLPipeline", "--device", "cuda:1"]) == 0
    out = capsys.readouterr().out
    assert "offload chain: text_encoder -> text_encoder_2 -> image_encoder -> unet" in out
    assert "on cuda:1" in out
    assert main(["explain", "vae-resident", "--pipeline", "StableDiffusionXLPipeline", "--device", "cuda"]) == 0
    assert "on cuda:0" in capsys.readouterr().out
    assert main(["explain", "vae-resident", "--pipeline", "StableDiffusionXLPipeline", "--device", "gpu"]) == 1
    assert "invalid device 'gpu'" in capsys.readouterr().err
    assert main(["explain", "diffusers-default", "--pipeline", "FluxPipeline", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pipeline"] == "FluxPipeline" and data["device"] == "auto"
    assert data["sequence"] == ["text_encoder", "text_encoder_2", "image_encoder", "transformer", "vae"]


def test_explain_unknown_pipeline_class(capsys):
    assert main(["explain", "diffusers-default", "--pipeline", "StableDiffusionXLPipelin"]) == 1
    err = capsys.readouterr().err
    assert "no pipeline class 'StableDiffusionXLPipelin'" in err and "Did you mean 'StableDiffusionXLPipeline'" in err


def test_explain_works_for_every_diffusers_pipeline_with_an_offload_sequence():
    import diffusers

    from offloadkit.policy.loading import load
    from offloadkit.plans.diffusers_offload import overrides_switch
    from offloadkit.plans.pipeline_spec import spec_from_class
    from offloadkit.plans.resolve import resolve

    policy = load("diffusers-default")
    checked = 0
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        try:
            cls = getattr(diffusers, name)
            seq = getattr(cls, "model_cpu_offload_seq", None)
        except ImportError:  # needs an optional package that is not installed
            continue
        # classes with their own switch follow it instead (tests/test_diffusers_overrides.py)
        if not isinstance(cls, type) or not isinstance(seq, str) or overrides_switch(cls):
            continue
        spec = spec_from_class(cls)
        plan = resolve(policy, spec, "cuda:0")
        # every name of the sequence that is a model component is chained, in the declared order
        declared = [n for n in dict.fromkeys(seq.split("->")) if n in spec.model_names and n not in spec.exclude]
        assert list(plan.sequence) == declared, name
        checked += 1
    assert checked > 200


def test_demo_runs_and_outputs_match(capsys):
    assert main(["demo", "--pipeline", "sd"]) == 0
    out = capsys.readouterr().out
    assert "outputs identical to the pipeline without offloading: yes" in out
    assert "onload" in out and "offload chain:" in out


def test_demo_with_a_policy_file(capsys):
    assert main(["demo", "--policy", str(ROOT / "examples" / "sdxl-8gb.yaml")]) == 0
    assert "sdxl-8gb" in capsys.readouterr().out


def test_demo_runs_a_half_precision_example_against_the_same_precision_change(capsys):
    """The fp8/int8 example is written for a float16 pipeline: on the default float32 demo it is refused at
    apply (compute_dtype), with --dtype fp16 it runs and is compared with its own precision change."""
    example = str(ROOT / "examples" / "sdxl-fp8-int8.yaml")
    assert main(["demo", "--policy", example]) == 1
    assert "compute_dtype" in capsys.readouterr().err
    assert main(["demo", "--policy", example, "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "float16)" in out and "float8_e4m3fn (layerwise casting" in out
    assert "outputs identical to the same precision change without offloading: yes" in out


def test_demo_bad_policy_is_a_clear_error(capsys):
    assert main(["demo", "--policy", "no-such-policy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no built-in policy or file named 'no-such-policy'" in err


@pytest.mark.parametrize("content, needle", [
    (b"version: 1\n\x00\n", "invalid character '\\x00'"),
    (b"version: true\n", "version: must be the number 1, not true"),
    (b"version: 1.0\n", "version: must be the whole number 1, not 1.0"),
    (b"version: 1\nsequence: [yes, no]\n", "sequence.0: must be a component name, not True"),
    (b"\xef\xbb\xbfversion: 1\r\nsequnce: auto\r\n", ":2:1 sequnce: unknown key"),
])
def test_odd_files_give_one_line_errors(tmp_path, capsys, content, needle):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_paths_give_one_line_errors(tmp_path, capsys):
    assert main(["validate", "a" * 5000 + ".yaml"]) == 1
    assert "File name too long" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 1
    assert "is a folder, not a policy file" in capsys.readouterr().err
    assert main(["schema", "--output", "/proc/no/such/dir/s.json"]) == 1
    assert "cannot write it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["demo", "--pipeline", "nope"])
    assert info.value.code == 2


def test_explain_refuses_non_pipeline_classes(capsys):
    for name in ("AutoPipelineForText2Image", "DiffusionPipeline", "__class__"):
        assert main(["explain", "diffusers-default", "--pipeline", name]) == 1
        err = capsys.readouterr().err
        assert "no concrete pipeline class" in err or "no pipeline class" in err


def test_plan_prints_stages_and_json(capsys):
    assert main(["plan", "diffusers-default", "--pipeline", "sd15", "--hardware", "rtx-3060-12gb", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "StableDiffusionPipeline under policy 'diffusers-default' on cuda:0 with hardware 'rtx-3060-12gb'" in out
    assert "512x512, 20 steps" in out and "text_encoder x2, unet x20, vae x1" in out
    for stage in ("encode", "denoise", "decode"):
        assert f"\n{stage}" in out
    assert main(["plan", "sequential", "--pipeline", "sd15", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == "sequential" and data["transfer_seconds"] is None  # no hardware: no times
    assert {s["stage"] for s in data["stages"]} == {"encode", "denoise", "decode"}


def test_validate_with_hardware_fails_a_policy_that_does_not_fit(capsys):
    resident = ROOT / "tests" / "fixtures" / "all-resident.yaml"
    assert main(["validate", "diffusers-default", str(resident), "--pipeline", "sdxl",
                 "--hardware", "rtx-4060-8gb"]) == 1
    captured = capsys.readouterr()
    assert "diffusers-default: valid for sdxl on rtx-4060-8gb" in captured.out
    assert "all-resident.yaml: does not fit rtx-4060-8gb: device memory: 10.1 GiB (peak 9.6 GiB + runtime overhead " \
        "512.0 MiB) on a machine with 8.0 GiB and 409.6 MiB headroom, over by 2.5 GiB" in captured.err
    assert main(["validate", str(resident), "--pipeline", "sdxl", "--hardware", "rtx-4090-24gb"]) == 0
    capsys.readouterr()
    # a prediction needs sizes: a pipeline class is not enough
    assert main(["validate", "diffusers-default", "--pipeline", "StableDiffusionXLPipeline",
                 "--hardware", "rtx-4090-24gb"]) == 2
    assert "needs sizes" in capsys.readouterr().err


def test_validate_with_hardware_checks_the_policys_own_budget(tmp_path, capsys):
    policy = tmp_path / "tight.yaml"
    policy.write_text("version: 1\nextends: diffusers-default\nbudget: {device_memory: 2GiB}\n")
    assert main(["validate", str(policy), "--pipeline", "sdxl", "--hardware", "rtx-4090-24gb"]) == 1
    assert "over its own budget of 2.0 GiB" in capsys.readouterr().err


def test_synthesize_writes_a_policy_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "sd15.yaml"
    assert main(["synthesize", "--pipeline", "sd15", "--vram", "2GiB", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["validate", str(out), "--pipeline", "sd15", "--hardware", "rtx-3060-12gb"]) == 0
    before = out.read_text()
    assert main(["synthesize", "--pipeline", "sd15", "--vram", "4GiB", "-o", str(out)]) == 1
    assert "exists; it was left as it is" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(["synthesize", "--pipeline", "sd15"]) == 2  # no limit given
    assert "needs a memory limit" in capsys.readouterr().err


def test_calibrate_writes_a_profile_that_loads(tmp_path, capsys):
    from offloadkit.prediction.hardware import load_hardware

    out = tmp_path / "hw.yaml"
    assert main(["calibrate", "--device", "cpu", "--quick", "--folder", str(tmp_path), "-o", str(out)]) == 0
    profile = load_hardware(out)
    assert profile.device == "cpu" and not profile.nominal and profile.h2d_pageable > 0
    assert main(["calibrate", "--device", "cpu", "--quick", "-o", str(out)]) == 1  # exists: kept


def test_planning_commands_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error
        main(["synthesize", "--pipeline", "sd15", "--vram", "lots"])
    assert exit_info.value.code == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    assert main(["synthesize", "--pipeline", "sd15", "--vram", "8GiB", "-o", str(tmp_path / "no" / "p.yaml")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert main(["validate", "diffusers-default", "sequential", "--pipeline", "sdxl", "--hardware", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("hardware profile file 'nope.yaml' not found") == 1
    assert main(["plan", "diffusers-default", "--pipeline", str(tmp_path)]) == 1
    assert "model_index.json not found" in capsys.readouterr().err
    assert main(["calibrate", "--device", "cpu", "--quick", "--folder", str(tmp_path / "missing")]) == 1
    assert "not a writable folder" in capsys.readouterr().err


def test_explain_with_an_architecture_shows_sizes(capsys):
    assert main(["explain", "diffusers-default", "--pipeline", "sdxl", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "unet            UNet2DConditionModel" in out and "4.8 GiB" in out  # fp16 weights of the 2.57B UNet
    assert "image_encoder" not in out.split("offload chain:")[1].splitlines()[0]  # not in this model's folder


def test_explain_sizes_in_the_models_own_dtype_or_the_one_given(capsys):
    assert main(["explain", "diffusers-default", "--pipeline", "flux1-dev"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("text_encoder_2")][0]
    assert "bfloat16" in line and "8.9 GiB" in line
    assert main(["explain", "diffusers-default", "--pipeline", "flux1-dev", "--dtype", "fp16"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("text_encoder_2")][0]
    assert "float16" in line and "10.7 GiB" in line



def test_validate_with_hardware_fails_a_policy_that_overflows_host_ram_and_names_it(capsys):
    assert main(["validate", "sequential", "--pipeline", "wan21-t2v-14b", "--hardware", "rtx-3060-12gb"]) == 1
    err = capsys.readouterr().err
    assert "does not fit rtx-3060-12gb: host RAM:" in err and "on a machine with 32.0 GiB" in err
    assert "device memory" not in err.split("(device peak")[0]  # device memory fits: not named


def test_plan_prints_every_limit_and_json_carries_them(capsys):
    assert main(["plan", "diffusers-default", "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb"]) == 0
    out = capsys.readouterr().out
    assert "limits of rtx-4060-8gb: fits every limit" in out
    assert "device memory: " in out and "host RAM: " in out and out.count(": fits") >= 2
    assert main(["plan", "diffusers-default", "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True
    # every limit is said to fit or not, those the call does not use (nothing pinned, nothing on disk) too
    assert [c["limit"] for c in data["limits"]] == ["device memory", "host RAM", "pinned host RAM", "disk"]
    assert [c["needed"] for c in data["limits"][2:]] == [0, 0] and all(c["fits"] for c in data["limits"])
    assert "pinned host RAM: none needed: fits" in out and "disk: none needed: fits" in out
    device = next(c for c in data["limits"] if c["limit"] == "device memory")
    assert device["capacity"] == 8 * 2**30 and device["headroom"] == int(0.05 * 8 * 2**30)
    assert device["available"] == device["capacity"] - device["headroom"] and device["needed"] <= device["available"]
    # a headroom of one's own
    assert main(["plan", "diffusers-default", "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb", "--json",
                 "--headroom", "2GiB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(c["headroom"] == 2 * 2**30 for c in data["limits"][:2])  # pinned RAM and disk keep none free
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "diffusers-default", "--pipeline", "sdxl", "--headroom", "lots"])
    assert exit_info.value.code == 2 and "cannot read 'lots'" in capsys.readouterr().err
    # without hardware: no limits
    assert main(["plan", "diffusers-default", "--pipeline", "sdxl", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["limits"] == [] and data["fits"] is None


@pytest.mark.parametrize("content, needle", [
    (b"version: 1\ndescription: 2024-13-01\n", ":2:14: '2024-13-01' is not a valid date"),
    (b"version: 1\nname: !!bool maybe\n", ":2:7: 'maybe' is not true or false"),
    (b"version: " + b"9" * 4301 + b"\n", ":1:10: number '999"),
    (b"version: 1\nname: " + b"[" * 493 + b"]" * 493 + b"\n", "nested deeper than 32 levels"),
    (b"version: 1\nbudget: {device_memory: '" + b"1" * 310 + b"'}\n", "budget.device_memory: size '111"),
    (b"version: 1\nname: \xff\n", ":2:7: file is not UTF-8 text"),
])
def test_validate_locates_what_pyyaml_and_python_cannot_read(tmp_path, capsys, content, needle):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:") and needle in err, err
    assert "error: unexpected" not in err and "Traceback" not in err


def test_validate_bounds_its_output(tmp_path, capsys):
    path = tmp_path / "aliases.yaml"
    path.write_text("version: 1\nname: &s '" + "x" * 200_000 + "'\nexclude:\n" + "  - *s\n" * 5000)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert len(err) < 50_000 and err.count("\n") == 51
    assert err.rstrip().endswith("... and 4,949 more problems. Fix these and check again to see the rest")


def test_empty_pipeline_name_is_a_usage_error(capsys):
    for command in (["validate", "diffusers-default"], ["explain", "diffusers-default"]):
        with pytest.raises(SystemExit) as info:
            main(command + ["--pipeline", ""])
        assert info.value.code == 2
        assert "--pipeline: empty pipeline name. Give a diffusers pipeline class" in capsys.readouterr().err


def test_validate_names_the_file_when_a_builtin_parent_does_not_fit(tmp_path, capsys):
    path = tmp_path / "child.yaml"
    path.write_text("version: 1\nextends: controlnet-resident\n")
    assert main(["validate", str(path), "--pipeline", "StableDiffusionXLPipeline"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("<builtin:controlnet-resident>:") and "has no component 'controlnet'" in err
    assert f"inherited through `extends` at {path}:2:10; override it in {path}" in err


def test_validate_a_cycle_points_into_the_file_given(tmp_path, capsys):
    (tmp_path / "cycle-a.yaml").write_text("version: 1\nextends: cycle-b.yaml\n")
    (tmp_path / "cycle-b.yaml").write_text("version: 1\nextends: cycle-a.yaml\n")
    assert main(["validate", str(tmp_path / "cycle-a.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path / 'cycle-a.yaml'}:2:10 extends: `extends` makes a cycle")
    assert "cycle-b.yaml:2:10 extends:" in err
