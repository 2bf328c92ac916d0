"""The package's layout holds: import-linter's contracts, no import cycle, registration that checks itself,
no strategy name compared outside the strategy's own files, and one stage vocabulary."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import offloadkit
from offloadkit.errors import UnknownComponentError
from offloadkit.plans.stages import stage_of
from offloadkit.policy.rules import RULES, StrategyRule, register_rule, strategy_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "offloadkit"


def test_import_linter_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is not installed: install the test extra (pip install -e '.[test]')")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_contracts_see_imports_inside_functions():
    """The policy contract forbids torch even in a function body: grimp reads those imports too."""
    import grimp

    graph = grimp.build_graph("offloadkit", include_external_packages=True, cache_dir=None)  # read the source as it is
    # accelerator imports torch only inside its functions
    assert "torch" in graph.find_modules_directly_imported_by("offloadkit.accelerator")


def _cycles(graph) -> list[str]:
    found = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            # a package's __init__ importing its own submodules is how Python packages work, not a cycle
            if imported.startswith(importer + ".") or importer.startswith(imported + "."):
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain:
                found.append(" -> ".join((importer, *chain)))
    return found


def test_no_import_cycle_anywhere_in_the_package():
    import grimp

    graph = grimp.build_graph("offloadkit", cache_dir=None)
    cycles = _cycles(graph)
    assert not cycles, "\n".join(cycles[:10])
    graph.add_import(importer="offloadkit.units", imported="offloadkit.policy.schema")  # schema imports units
    assert _cycles(graph)  # the check finds a cycle where there is one


def test_every_rule_has_an_installer_and_registration_checks_itself():
    from offloadkit.runtime.strategies import INSTALLERS, register_installer
    from offloadkit.runtime.strategies.registry import check_complete

    assert set(INSTALLERS) == set(RULES.values())
    check_complete()
    assert strategy_names() == sorted(RULES)

    from typing import Literal

    with pytest.raises(ValueError, match="registered twice"):
        @register_rule
        class Again(StrategyRule):
            strategy: Literal["model"]
    with pytest.raises(ValueError, match="lower-case"):
        @register_rule
        class Shouting(StrategyRule):
            strategy: Literal["Stream"]
    with pytest.raises(TypeError, match="Literal"):
        @register_rule
        class Untagged(StrategyRule):
            pass

    class Unregistered(StrategyRule):
        strategy: Literal["unregistered"]

    with pytest.raises(ValueError, match="not a registered rule class"):
        register_installer(Unregistered, lambda *args: None)
    with pytest.raises(ValueError, match="two installers"):
        register_installer(RULES["model"], lambda *args: None)
    assert "unregistered" not in RULES and "Stream" not in RULES


def test_a_rule_without_an_installer_is_found(monkeypatch):
    from offloadkit.runtime.strategies import registry

    monkeypatch.delitem(registry.INSTALLERS, RULES["disk"])
    with pytest.raises(RuntimeError, match="strategies without an installer: disk"):
        registry.check_complete()


def _strategy_strings(tree):
    names = set(strategy_names())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for value in values:
                    if isinstance(value, ast.Constant) and value.value in names:
                        yield node.lineno, value.value


def test_no_module_outside_a_strategys_files_compares_strategy_names():
    own = {PACKAGE / "policy" / "rules.py"} | set((PACKAGE / "runtime" / "strategies").glob("*.py"))
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path in own:
            continue
        for line, name in _strategy_strings(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"{path.relative_to(ROOT)}:{line} compares {name!r}")
    assert not found, "\n".join(found)
    # the check itself finds what it is for
    assert list(_strategy_strings(ast.parse('if c.strategy in ("sequential", "disk"): pass')))


@pytest.mark.parametrize("pipeline, stages", [
    ("StableCascadeDecoderPipeline", {"text_encoder": "encode", "decoder": "denoise", "vqgan": "decode"}),
    ("StableCascadePriorPipeline", {"text_encoder": "encode", "image_encoder": "encode", "prior": "denoise"}),
    ("KandinskyPipeline", {"text_encoder": "encode", "unet": "denoise", "movq": "decode"}),
    ("KandinskyPriorPipeline", {"text_encoder": "encode", "image_encoder": "encode", "prior": "denoise"}),
    ("WuerstchenDecoderPipeline", {"text_encoder": "encode", "decoder": "denoise", "vqgan": "decode"}),
    ("WuerstchenPriorPipeline", {"text_encoder": "encode", "prior": "denoise"}),
    ("AudioLDM2Pipeline", {"text_encoder": "encode", "text_encoder_2": "encode", "projection_model": "encode",
                           "language_model": "encode", "unet": "denoise", "vae": "decode", "vocoder": "decode"}),
])
def test_stages_come_from_the_class_first_and_the_schedule_and_trace_agree(pipeline, stages):
    from offloadkit.plans.pipeline_spec import spec_from_class
    from offloadkit.plans.resolve import resolve
    from offloadkit.prediction.schedule import CallSettings, schedule
    from offloadkit.runtime.trace import Trace

    spec = spec_from_class(pipeline)
    models = {c.name: c for c in spec.components if c.is_model}
    assert {name: models[name].stage for name in stages} == stages
    call = schedule(pipeline, list(models), CallSettings(steps=3), offload_seq=spec.offload_seq or (),
                    stages={n: c.stage for n, c in models.items()})
    # every decoding model runs once, after the denoising loop; the denoisers run once a step
    for name, stage in stages.items():
        if stage == "decode":
            assert call.count(name) == 1 and call.forwards.index(name) > call.forwards.index(
                next(n for n, s in stages.items() if s == "denoise"))
        if stage == "denoise":
            assert call.count(name) == 3
    # the trace labels a component's moves with the same stage as the plan
    policy = offloadkit.load({"version": 1, "components": {"*": {"strategy": "resident"}}})
    plan = resolve(policy, spec, "cpu:0")
    trace = Trace(stages={c.name: c.stage for c in plan.components})
    for name, stage in stages.items():
        assert plan.component(name).stage == stage
        trace.record(name, "onload", "cpu", "cpu:0", 1, 0.0)
        assert trace.events[-1].stage == stage


def test_stage_by_name_when_the_class_is_unknown():
    assert stage_of("decoder") == "decode" and stage_of("decoder", "StableCascadeUNet") == "denoise"
    assert stage_of("text_encoder_3") == "encode" and stage_of("transformer") == "denoise"
    assert stage_of("vae", "AutoencoderKLWan") == "decode" and stage_of("controlnet", "ControlNetModel") == "denoise"


def test_plan_component_raises_an_offloadkit_error_that_is_a_key_error_too():
    from offloadkit.plans.pipeline_spec import spec_from_class
    from offloadkit.plans.resolve import resolve

    plan = resolve(offloadkit.load("diffusers-default"), spec_from_class("StableDiffusionPipeline"), "cpu:0")
    with pytest.raises(UnknownComponentError, match="no component 'unet2'. Did you mean 'unet'") as info:
        plan.component("unet2")
    assert isinstance(info.value, KeyError) and isinstance(info.value, offloadkit.OffloadkitError)


def test_a_rule_stays_the_frozen_object_from_loading_to_the_plan():
    from offloadkit.plans.pipeline_spec import spec_from_class
    from offloadkit.plans.resolve import resolve

    policy = offloadkit.load({"version": 1, "components": {"unet": {"strategy": "group", "use_stream": False},
                                                           "vae": {"strategy": "resident"}}})
    plan = resolve(policy, spec_from_class("StableDiffusionPipeline"), "cpu:0")
    assert plan.component("unet").rule is policy.components["unet"]
    assert plan.component("vae").rule is policy.components["vae"]
    with pytest.raises(Exception, match="frozen"):
        plan.component("unet").rule.use_stream = True


def test_errors_mean_one_thing():
    from offloadkit.errors import DtypeError, ModelSourceError, PipelineError, PolicyError, SynthesisError
    from offloadkit.prediction.sizing import model_folder
    from offloadkit.units import dtype_name

    with pytest.raises(ModelSourceError) as info:
        model_folder("sdxll")
    assert not isinstance(info.value, PipelineError)
    with pytest.raises(DtypeError):
        dtype_name("int3")
    assert offloadkit.SynthesisError is SynthesisError and issubclass(SynthesisError, offloadkit.OffloadkitError)
    assert not issubclass(offloadkit.HardwareError, PolicyError)
