"""The CLI's contract for newcomers and scripts: --json shapes (golden), exit codes, the schema that resolves,
and no other library's noise on the terminal.

Goldens: tests/golden/cli/*.json, compared after `masked()` (sizes, times and counts vary with offloadkit's
predictor, not with the shape). Regenerate after an intended change: `.venv/bin/python tests/golden/regenerate.py
cli`, and review the diff: a changed key is a change for every script that reads the output.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from offloadkit import cli, progress
from offloadkit.cli import main
from offloadkit.policy.schema import installed_schema_path, json_schema, json_schema_text

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "cli"
OFFLOADKIT = Path(sys.executable).parent / "offloadkit"

# name -> (arguments, exit code). Paths are relative to the repository root, where they run.
CLI_CASES = {
    "validate": (["validate", "--json", "diffusers-default", "tests/fixtures/invalid/bad_device.yaml"], 1),
    "validate-hardware": (["validate", "--json", "diffusers-default", "tests/fixtures/all-resident.yaml",
                           "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb"], 1),
    "explain": (["explain", "--json", "vae-resident", "--pipeline", "sdxl", "--device", "cuda"], 0),
    "plan": (["plan", "--json", "diffusers-default", "--pipeline", "sd15", "--hardware", "rtx-3060-12gb"], 0),
    "synthesize": (["synthesize", "--json", "--pipeline", "sd15", "--vram", "2GiB"], 0),
    "list": (["list", "--json"], 0),
    "error": (["plan", "--json", "no-such-policy", "--pipeline", "sd15"], 1),
}

# numbers that are part of the shape (positions, format versions), not predictions
_KEPT_NUMBERS = {"version", "exit_code", "line", "column", "chain_index"}
_SIZE_OR_TIME = re.compile(r"\d+(?:\.\d+)?(?=\s?(?:B|KiB|MiB|GiB|TiB|s)\b)")


def masked(value, key=None):
    """The output with what the predictor decides (numbers, sizes and times in text, the synthesized YAML)
    replaced by placeholders; keys, nesting, names, strategies and verdicts stay."""
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if key in _KEPT_NUMBERS else "<number>"
    if isinstance(value, str):
        if "\n" in value:  # synthesize's YAML text: its own tests check what it says
            return "<text>"
        return _SIZE_OR_TIME.sub("<n>", value)
    return value


def run_case(name: str, capsys) -> dict:
    """Run one case in-process from the repository root; its JSON, masked."""
    arguments, code = CLI_CASES[name]
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(arguments) == code, name
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return masked(json.loads(captured.out))


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_json_output_matches_golden(name, capsys):
    data = run_case(name, capsys)
    assert data["version"] == 1 and data["command"] == CLI_CASES[name][0][0]
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    assert data == golden, (f"`offloadkit {' '.join(CLI_CASES[name][0])}` changed shape: if intended, run "
                            "`.venv/bin/python tests/golden/regenerate.py cli` and review the diff")


def test_masking_keeps_the_shape_and_hides_predictions():
    assert masked({"version": 1, "needed": 5, "fits": True, "detail": "peak 5.1 GiB + 0.2 s", "line": 4}) == {
        "version": 1, "needed": "<number>", "fits": True, "detail": "peak <n> GiB + <n> s", "line": 4}


def test_validate_json_reports_each_file_with_located_problems(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "--json", "tests/fixtures/invalid/bad_device.yaml", "sequential"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is False and [f["valid"] for f in data["files"]] == [False, True]
    problem = data["files"][0]["problems"][0]
    assert (problem["line"], problem["column"], problem["path"]) == (4, 9, "device")
    assert "invalid device 'cuda1'" in problem["message"]


def test_validate_with_hardware_says_fits_for_every_limit(capsys):
    resident = str(ROOT / "tests" / "fixtures" / "all-resident.yaml")
    assert main(["validate", "diffusers-default", resident, "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb"]) == 1
    captured = capsys.readouterr()
    good = captured.out.split("diffusers-default: valid for sdxl on rtx-4060-8gb\n", 1)[1]
    for limit in ("device memory", "host RAM", "pinned host RAM", "disk"):
        assert re.search(rf"^  {limit}: .*: fits$", good, re.M), (limit, good)
    assert re.search(r"^  device memory: .*: OVER by ", captured.err, re.M), captured.err
    assert main(["validate", "--json", resident, "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb"]) == 1
    entry = json.loads(capsys.readouterr().out)["files"][0]
    assert entry["fits"] is False and [c["fits"] for c in entry["limits"]] == [False, True, True, True]


def test_plan_that_does_not_fit_exits_1_and_says_which_limit(capsys):
    resident = str(ROOT / "tests" / "fixtures" / "all-resident.yaml")
    assert main(["plan", resident, "--pipeline", "sdxl", "--hardware", "rtx-4060-8gb"]) == 1
    out = capsys.readouterr().out
    assert "limits of rtx-4060-8gb: does NOT fit" in out
    assert re.search(r"^  device memory: .*: OVER by ", out, re.M)
    assert re.search(r"^  host RAM: .*: fits$", out, re.M) and "  disk: none needed: fits" in out


def test_an_unexpected_exception_exits_3_with_a_hint_to_report_it(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(cli._COMMANDS, "list", broken)
    monkeypatch.delenv("OFFLOADKIT_DEBUG", raising=False)
    assert main(["list"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: internal RuntimeError: boom") and "please report it" in err
    assert "Traceback" not in err
    assert main(["list", "--json"]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"version": 1, "command": "list", "exit_code": 3,
                                        "error": captured.err.strip()[len("error: "):]}


def test_exit_codes_are_in_the_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    table = out.split("exit codes (every command):", 1)[1]
    for code, meaning in (("0", "ok"), ("1", "invalid"), ("2", "usage"), ("3", "internal error")):
        assert re.search(rf"^  {code} +{meaning}", table, re.M), code
    assert '"version": 1' in out


def test_quiet_switches_progress_off_for_the_command_only(monkeypatch):
    seen = []
    monkeypatch.setitem(cli._COMMANDS, "list", lambda args: seen.append(progress.enabled) or 0)
    monkeypatch.setattr(progress, "enabled", None)
    assert main(["list", "-q"]) == 0 and main(["-q", "list"]) == 0 and main(["--quiet", "list"]) == 0
    assert main(["list"]) == 0
    assert seen == [False, False, False, None]
    assert progress.enabled is None  # put back: main() runs in-process too


def test_verbose_is_accepted_before_and_after_the_command():
    assert cli._parser().parse_args(["-v", "list"]).verbose is True
    assert cli._parser().parse_args(["list", "-v"]).verbose is True
    assert cli._parser().parse_args(["list"]).verbose is False


# --- the schema ---------------------------------------------------------------------------------------------


def test_bare_schema_prints_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for arguments in (["schema"], ["schema", "--print"]):
        assert main(arguments) == 0
        assert capsys.readouterr().out == json_schema_text()
    assert list(tmp_path.iterdir()) == []  # no schemas/ folder made where it ran
    assert main(["schema", "--print", "-o", "s.json"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["schema", "-o", "sub/s.json"]) == 0 and (tmp_path / "sub" / "s.json").read_text() == json_schema_text()
    # --check without -o: the project's schemas/policy.schema.json, here missing
    assert main(["schema", "--check"]) == 1
    assert "missing. Run `offloadkit schema -o schemas/policy.schema.json`" in capsys.readouterr().err
    monkeypatch.chdir(ROOT)
    assert main(["schema", "--check"]) == 0


def test_no_url_of_a_domain_the_project_does_not_own():
    assert "://" not in json_schema()["$id"]
    from offloadkit.prediction.hardware import hardware_json_schema

    assert "://" not in hardware_json_schema()["$id"]
    found = []
    for folder in ("offloadkit", "schemas", "policies", "hardware", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".json", ".yaml", ".md") and \
                    "://offloadkit.dev" in path.read_text(encoding="utf-8", errors="replace"):
                found.append(str(path.relative_to(ROOT)))
    assert not found


def test_the_schema_ships_where_the_builtin_policies_point():
    import tomllib

    config = json.loads(json.dumps(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]))
    assert "offloadkit.policy.schemas" in config["packages"]
    assert config["package-dir"]["offloadkit.policy.schemas"] == "schemas"
    assert "*.json" in config["package-data"]["offloadkit.policy.schemas"]
    # the built-in policies land in offloadkit/policy/builtin: their `../schemas/` is offloadkit/policy/schemas
    assert config["package-dir"]["offloadkit.policy.builtin"] == "policies"
    first = (ROOT / "policies" / "diffusers-default.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/policy.schema.json"
    assert installed_schema_path().read_text() == json_schema_text()


def test_synthesize_writes_a_schema_line_that_resolves(tmp_path, capsys):
    out = tmp_path / "deep" / "sd15.yaml"
    out.parent.mkdir()
    assert main(["synthesize", "--pipeline", "sd15", "--vram", "2GiB", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    first = out.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    where = first.split("$schema=", 1)[1]
    assert not Path(where).is_absolute() and "://" not in where
    assert (out.parent / where).resolve().read_text() == json_schema_text()
    # printed: no file to be relative to, and the header says so instead of naming a path that does not resolve
    assert main(["synthesize", "--pipeline", "sd15", "--vram", "2GiB", "-q"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed.startswith("# No `$schema` line (printed") and "-o FILE" in printed


# --- no noise -----------------------------------------------------------------------------------------------

# lines other libraries write on import or first use in this environment (bitsandbytes, torchao, torch's pytree
# deprecations, transformers' torchvision fallback, Python warnings)
_NOISE = re.compile(r"Failed to load|torchao|_pytree|\[transformers\]|Warning:|kernels-community")


def test_importing_offloadkit_prints_nothing_even_with_warnings_as_errors():
    result = subprocess.run([sys.executable, "-W", "error", "-c", "import offloadkit"], capture_output=True,
                            text=True, cwd=ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _explain(*extra):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OFFLOADKIT_DEBUG", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    return subprocess.run([str(OFFLOADKIT), "explain", "diffusers-default", "--pipeline", "StableDiffusionXLPipeline",
                           *extra], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120)


@pytest.mark.skipif(not OFFLOADKIT.exists(), reason="the offloadkit script is not installed beside this Python")
def test_commands_hide_other_libraries_noise_unless_verbose():
    quiet = _explain()
    assert quiet.returncode == 0 and "offload chain:" in quiet.stdout
    assert not _NOISE.search(quiet.stderr), quiet.stderr
    assert quiet.stderr == ""
    verbose = _explain("-v")
    assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
    if not _NOISE.search(verbose.stderr):
        pytest.skip("no library writes such lines in this environment, so -v has nothing to show")


# --- explain's table ----------------------------------------------------------------------------------------


def _row(out: str, name: str) -> list[str]:
    """The cells of one component's row (cells are separated by two or more spaces)."""
    line = next(l for l in out.splitlines() if l.startswith(name + " "))
    return re.split(r"\s{2,}", line)


def test_explain_shows_how_weights_move_and_what_auto_means(tmp_path, capsys):
    policy = tmp_path / "moves.yaml"
    policy.write_text("version: 1\ncomponents:\n  unet: {strategy: model, transfer: pinned, prefetch: true}\n"
                      "  vae: {strategy: model, transfer: copy-free}\n  text_encoder: {strategy: resident}\n")
    assert main(["explain", str(policy), "--pipeline", "StableDiffusionXLPipeline"]) == 0
    out = capsys.readouterr().out
    header, *rest = out.splitlines()
    assert header.endswith("on auto (the accelerator where the policy is applied)")
    columns = re.split(r"\s{2,}", next(l for l in rest if l.startswith("component ")))
    assert columns[4:7] == ["runs on", "offloaded by", "moves"]
    assert _row(out, "unet")[4] == "device" and _row(out, "unet")[6] == "pinned, prefetch"
    assert _row(out, "vae")[6] == "copy-free" and _row(out, "text_encoder")[6] == "-"
    assert " auto " not in "\n".join(rest)  # `auto` is explained once, in the header
    assert main(["explain", str(policy), "--pipeline", "StableDiffusionXLPipeline", "--device", "cuda:1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("on cuda:1") and _row(out, "unet")[4] == "cuda:1"


def test_explain_of_a_class_says_what_the_hub_checkpoint_lacks(capsys):
    """A class cannot know an optional component is absent; the architecture's model_index.json does."""
    assert main(["explain", "diffusers-default", "--pipeline", "sdxl"]) == 0
    from_architecture = capsys.readouterr().out
    chain = from_architecture.split("offload chain: ", 1)[1].splitlines()[0]
    assert chain == "text_encoder -> text_encoder_2 -> unet -> vae"
    assert main(["explain", "diffusers-default", "--pipeline", "StableDiffusionXLPipeline"]) == 0
    from_class = capsys.readouterr().out
    notes = [l for l in from_class.splitlines() if l.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith("note: image_encoder: optional in StableDiffusionXLPipeline")
    assert "architecture 'sdxl' has no image_encoder: `--pipeline sdxl`" in notes[0]
    # the class's chain minus what the checkpoint lacks is the architecture's chain
    class_chain = from_class.split("offload chain: ", 1)[1].splitlines()[0]
    assert class_chain.replace("image_encoder -> ", "") == chain
    assert main(["explain", "diffusers-default", "--pipeline", "StableDiffusionXLPipeline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [notes[0][len("note: "):]]
