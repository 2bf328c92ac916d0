import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from offloadkit import DeviceError, HardwareError, PolicyError
from offloadkit.prediction.calibrate import calibrate
from offloadkit.prediction.hardware import (
    HardwareProfile,
    Measurement,
    dump_hardware_yaml,
    hardware_json_schema,
    hardware_names,
    load_hardware,
)
from offloadkit.units import parse_bandwidth, parse_compute

FIXTURES = Path(__file__).parent / "fixtures"
INVALID = sorted((FIXTURES / "hardware").glob("*.yaml"))
BUILTIN_FOLDER = Path(__file__).parent.parent / "hardware"

MINIMAL = {"version": 1, "name": "box", "device": "cuda", "device_memory": "24GiB", "host_memory": "64GiB",
           "h2d_pinned": "25GB/s", "h2d_pageable": "12GB/s", "disk_read": "3GB/s"}


def expectations(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [m.group(1) for line in lines if (m := re.match(r"# expect: (.*)$", line))]


# --- built-ins ----------------------------------------------------------------------------------

def test_builtin_names_match_the_shipped_files():
    names = hardware_names()
    assert names == sorted(p.stem for p in BUILTIN_FOLDER.glob("*.yaml"))
    assert len(names) >= 6
    assert {"rtx-4090-24gb", "h100-80gb", "a100-80gb"} <= set(names)


@pytest.mark.parametrize("name", hardware_names())
def test_every_builtin_loads_and_is_nominal(name):
    profile = load_hardware(name)
    assert profile.name == name
    assert profile.nominal and profile.measured is None
    assert profile.device == "cuda"
    assert profile.h2d_pinned >= profile.h2d_pageable > 0
    assert profile.compute and profile.compute_dtype == "float16"
    text = (BUILTIN_FOLDER / f"{name}.yaml").read_text(encoding="utf-8")
    # every figure is sourced or labelled as an assumption in the file's comments
    for word in ("device_memory", "host link", "h2d_pinned", "disk_read", "compute", "assumption"):
        assert word in text, f"{name}.yaml does not say where {word!r} comes from"
    assert load_hardware(yaml.safe_load(dump_hardware_yaml(profile))) == profile


def test_builtin_values_are_what_the_files_say():
    profile = load_hardware("rtx-4090-24gb")
    assert profile.device_memory == 24 * 2**30
    assert profile.h2d_pinned == 25_200_000_000
    assert profile.compute == 165_200_000_000_000
    assert load_hardware("rtx-4060-8gb").h2d_pinned == load_hardware("rtx-4090-24gb").h2d_pinned // 2  # x8 link


def test_unknown_builtin_suggests_the_closest():
    with pytest.raises(HardwareError) as info:
        load_hardware("rtx-4090-24g")
    assert "no built-in hardware profile or file named 'rtx-4090-24g'" in str(info.value)
    assert "Did you mean 'rtx-4090-24gb'?" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(HardwareError, match="hardware profile file .* not found"):
        load_hardware(str(tmp_path / "nope.yaml"))


# --- loading ------------------------------------------------------------------------------------

def test_fixture_files_have_expectations():
    assert len(INVALID) >= 10
    for path in INVALID:
        assert expectations(path), f"{path.name} has no '# expect:' lines"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_profile_errors(path, monkeypatch):
    monkeypatch.chdir(FIXTURES.parent.parent)
    shown = os.path.relpath(path)
    with pytest.raises(HardwareError) as info:
        load_hardware(shown)
    message = str(info.value)
    for expected in expectations(path):
        assert expected.replace("{file}", shown) in message, message


def test_all_problems_of_a_file_are_reported_at_once():
    with pytest.raises(HardwareError) as info:
        load_hardware(FIXTURES / "hardware" / "many_errors.yaml")
    assert sorted(p.dotted_path for p in info.value.problems) == ["device_memory", "disk_read", "disk_red",
                                                                  "h2d_pinned"]


def test_hardware_error_is_a_value_error_and_not_a_policy_error():
    with pytest.raises(HardwareError) as info:
        load_hardware({**MINIMAL, "device": "gpu"})
    assert isinstance(info.value, ValueError) and not isinstance(info.value, PolicyError)

def test_the_shared_yaml_reader_raises_the_profiles_own_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: [unclosed\n")
    for source in (bad, "no-such-profile"):
        with pytest.raises(HardwareError) as info:
            load_hardware(source)
        assert not isinstance(info.value, PolicyError)


def test_dict_errors_name_the_path():
    with pytest.raises(HardwareError) as info:
        load_hardware({**MINIMAL, "measured": {"date": "2025-06-01T12:00:00Z", "quik": True}})
    assert str(info.value).startswith("<dict> measured.quik: unknown key 'quik'. Did you mean 'quick'?")


def test_load_path_dict_and_profile(tmp_path):
    profile = load_hardware(MINIMAL)
    assert profile.device_memory == 24 * 2**30 and profile.disk_read == 3 * 10**9
    assert profile.nominal is False and profile.d2h is None and profile.compute is None
    assert load_hardware(profile) is profile
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    assert load_hardware(path) == profile
    assert load_hardware(str(path)) == profile
    with pytest.raises(HardwareError, match="cannot load a hardware profile from int"):
        load_hardware(3)


def test_profile_is_frozen():
    profile = load_hardware(MINIMAL)
    with pytest.raises(ValueError):
        profile.device_memory = 1


def test_device_with_an_index_is_refused_with_the_fix():
    with pytest.raises(HardwareError, match="Write `device: cuda`"):
        load_hardware({**MINIMAL, "device": "cuda:0"})


@pytest.mark.parametrize("text, expected", [
    ("25GB/s", 25 * 10**9), ("12.5 GiB/s", round(12.5 * 2**30)), ("800MB/s", 8 * 10**8), (2.5e10, 25 * 10**9),
    (1000, 1000), ("3e9", 3 * 10**9), ("12.3GB/s", 12_300_000_000), ("1kB/s", 1000),
])
def test_bandwidth_units(text, expected):
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["25GB", "25 Gb/s", "3Gbps", "16GT/s", "fast", "-1GB/s", "0", True, float("nan")])
def test_bad_bandwidths(text):
    with pytest.raises(ValueError):
        parse_bandwidth(text)


@pytest.mark.parametrize("text, expected", [
    ("82TFLOPS", 82 * 10**12), ("82 TFLOP/s", 82 * 10**12), ("950GFLOPS", 950 * 10**9), ("82.6tflops", 82.6e12),
    (1.5e12, 15 * 10**11), ("1.979PFLOP/s", 1_979 * 10**12),
])
def test_compute_units(text, expected):
    assert parse_compute(text) == round(expected)


def test_loading_does_not_import_torch():
    code = ("import sys, offloadkit.prediction.hardware as h\n"
            "h.load_hardware('rtx-4090-24gb'); h.hardware_json_schema(); h.dump_hardware_yaml(h.load_hardware('l4-24gb'))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- schema -------------------------------------------------------------------------------------

def test_json_schema_describes_every_field():
    schema = hardware_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"version", "name", "device", "device_memory", "host_memory", "h2d_pinned",
                                       "h2d_pageable", "disk_read"}
    for model in (HardwareProfile, Measurement):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    assert schema["properties"]["device"]["enum"][:2] == ["cpu", "cuda"]
    json.dumps(schema)


def test_schema_patterns_accept_what_the_parser_accepts():
    props = hardware_json_schema()["properties"]
    bandwidth = next(s["pattern"] for s in props["h2d_pinned"]["anyOf"] if "pattern" in s)
    compute = next(s["pattern"] for s in props["compute"]["anyOf"] if "pattern" in s)
    for text in ("25GB/s", "12.5 GiB/s", "3e9"):
        assert re.match(bandwidth, text) and parse_bandwidth(text)
    for text in ("82TFLOPS", "82 TFLOP/s", "950gflops"):
        assert re.match(compute, text) and parse_compute(text)
    assert not re.match(bandwidth, "25Gb/s") and not re.match(compute, "82TOPS")


# --- writing ------------------------------------------------------------------------------------

def test_dump_is_readable_and_exact_for_odd_values():
    profile = load_hardware({**MINIMAL, "device_memory": 25_393_692_672, "host_memory": 24_683_656 * 1024,
                             "h2d_pinned": 26_123_456_789, "d2h": "12.5GiB/s", "compute": 82_600_000_000_000,
                             "compute_dtype": "float16", "description": "a box: with a colon"})
    text = dump_hardware_yaml(profile)
    assert text.startswith("# offloadkit hardware profile")
    assert "device_memory: 24217.3125MiB  # 23.65 GiB" in text
    assert "host_memory: 24683656KiB  # 23.54 GiB" in text
    assert "h2d_pinned: 26.123456789GB/s" in text and "d2h: 13.4217728GB/s" in text
    assert "compute: 82.6TFLOP/s" in text and "disk_read: 3GB/s" in text
    assert load_hardware(yaml.safe_load(text)) == profile


# --- measuring ----------------------------------------------------------------------------------

def test_calibrate_cpu_quick(tmp_path):
    start = time.perf_counter()
    profile = calibrate("cpu", quick=True, folder=tmp_path)
    assert time.perf_counter() - start < 3
    assert profile.device == "cpu" and not profile.nominal
    with open("/proc/meminfo") as handle:
        total_kib = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1])
    assert profile.host_memory == profile.device_memory == total_kib * 1024
    # plausible for any machine that runs the tests: more than 10 MB/s and 10 MFLOP/s, less than 10 TB/s
    for figure in (profile.h2d_pinned, profile.h2d_pageable, profile.d2h, profile.disk_read):
        assert 10**7 < figure < 10**13
    assert 10**7 < profile.compute < 10**15 and profile.compute_dtype == "float32"
    # a real transformer block's share of the matmul rate, measured (not the profiles' assumed 0.5)
    assert 0 < profile.compute_efficiency <= 1
    assert any(note.startswith("compute_efficiency: a BasicTransformerBlock forward") for note in profile.measured.notes)
    m = profile.measured
    assert m.quick and m.torch and m.threads >= 1 and m.date.tzinfo is not None
    assert any("the device is the CPU" in note for note in m.notes)
    assert list(tmp_path.iterdir()) == []  # the disk test file is gone

    text = dump_hardware_yaml(profile)
    assert "# Measured by offloadkit calibrate" in text
    path = tmp_path / "hw.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_hardware(path) == profile


def test_calibrate_refuses_a_device_that_is_not_here():
    from offloadkit import DeviceError

    with pytest.raises(DeviceError):
        calibrate("cuda:99", quick=True)


def test_calibrate_names_an_unwritable_folder(tmp_path):
    with pytest.raises(DeviceError, match="cannot (create|write) the disk test file"):
        calibrate("cpu", quick=True, folder=tmp_path / "missing")


@pytest.mark.gpu
def test_calibrate_cuda(tmp_path):
    import torch

    profile = calibrate("cuda", quick=True, folder=tmp_path)
    assert profile.device == "cuda"
    assert profile.device_memory == torch.cuda.mem_get_info(torch.cuda.current_device())[1]
    assert profile.h2d_pinned >= profile.h2d_pageable > 0
    assert profile.compute_dtype == "float16" and profile.compute > 10**12
    assert profile.measured.runtime
    assert load_hardware(yaml.safe_load(dump_hardware_yaml(profile))) == profile
