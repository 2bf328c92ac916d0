"""The `offloadkit` command. Argument parsing and printing only; the work lives in the library.

`validate` and `schema` never import torch, so they run in lightweight CI jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import OffloadkitError

# Where `schema --check` looks without -o: the file a project keeps at its top (this repository does).
DEFAULT_SCHEMA_PATH = Path("schemas") / "policy.schema.json"

# The exit codes of every command (a contract: CI jobs and pre-commit read them).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = """exit codes (every command):
  0    ok: valid, fits, written or printed
  1    invalid or does not fit: a policy or profile is invalid, a plan does not fit its hardware, no policy
       fits, or a file cannot be read or written (the message says which and what to do)
  2    usage: an unknown command or option, a bad or missing value
  3    internal error: a bug in offloadkit or a broken install; please report it (OFFLOADKIT_DEBUG=1 shows the
       traceback)
  130  interrupted (Ctrl-C)

--json output (validate, explain, plan, synthesize, list) is one JSON object on standard output with
"version": 1 (the format of the output, changed only with a new number) and "command"; on exit 1 or 3 it is
{"version": 1, "command": ..., "error": MESSAGE, "exit_code": N} (validate reports each file instead).
Other libraries' log lines and warnings are hidden unless -v is given."""

JSON_VERSION = 1  # the format version of every command's --json output

# Loggers of libraries that log on import or first use what the user cannot act on (bitsandbytes' kernels-community
# line, torchao's unloadable kernels, torch's pytree deprecations, transformers' torchvision fallback).
_NOISY_LOGGERS = ("bitsandbytes", "torchao", "torch", "torch.utils._pytree", "transformers", "diffusers",
                  "accelerate", "optimum", "huggingface_hub", "kernels", "gguf", "peft")


def _versions() -> str:
    """`offloadkit 0.1.0 (torch 2.13.0, diffusers 0.42.1, ...)`, read from the installed packages' metadata
    (nothing is imported: it answers at once, and also where a library is broken)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = []
    for package in ("torch", "diffusers", "accelerate", "transformers", "pydantic"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return f"offloadkit {__version__} ({', '.join(found)})"


class _Version(argparse.Action):
    """Prints `_versions()` on one line (argparse's own version action wraps it) and exits 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())
        parser.exit(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offloadkit",
        description="Declarative offload policies for diffusers pipelines.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="offloadkit's version and those of the libraries it runs on (for bug reports)")
    _add_output_arguments(parser, on_top=True)
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    commands.required = True

    validate = commands.add_parser("validate", help="check policy files (exit 0 valid, 1 invalid, 2 usage)")
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy files or built-in names")
    validate.add_argument("--pipeline", metavar="CLASS|MODEL", type=_pipeline_argument,
                          help="also check component names against this diffusers pipeline class, built-in "
                               "architecture (sdxl, flux1-dev, ...) or model folder")
    validate.add_argument("--hardware", metavar="PROFILE",
                          help="also fail when the predicted peak exceeds this hardware profile's device memory or "
                               "the policy's own budget (needs --pipeline as an architecture or model folder); "
                               "says fits / does not fit for each limit")
    validate.add_argument("--json", action="store_true", help="print the result of every file as JSON")
    _add_call_arguments(validate)

    explain = commands.add_parser("explain", help="print the plan of a policy for a pipeline class (no weights)")
    explain.add_argument("policy", metavar="POLICY", help="policy file or built-in name")
    explain.add_argument("--pipeline", metavar="CLASS|MODEL", type=_pipeline_argument, required=True,
                         help="diffusers pipeline class name, or a built-in architecture or model folder (then "
                              "with sizes)")
    explain.add_argument("--device", help="override the policy's device (shown as given)")
    explain.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                         help="with an architecture or model folder: the weights' dtype for the sizes (default: "
                              "the model's own)")
    explain.add_argument("--json", action="store_true", help="print the plan (plan.to_dict()) as JSON")

    plan = commands.add_parser("plan", help="predict memory per stage, bytes moved and transfer time of a call, "
                                            "before loading anything; with --hardware, fits / does not fit per "
                                            "limit (exit 1 when it does not fit)")
    plan.add_argument("policy", metavar="POLICY", help="policy file or built-in name")
    plan.add_argument("--pipeline", metavar="MODEL", required=True, type=_pipeline_argument,
                      help="built-in architecture (see `offloadkit list`) or model folder (model_index.json + configs)")
    plan.add_argument("--hardware", metavar="PROFILE", help="hardware profile file or built-in name (for times)")
    plan.add_argument("--device", help="override the policy's (and the profile's) device")
    plan.add_argument("--json", action="store_true", help="print the prediction as JSON")
    _add_call_arguments(plan)

    synth = commands.add_parser("synthesize", help="write the policy predicted fastest among those that fit")
    synth.add_argument("--pipeline", metavar="MODEL", required=True, type=_pipeline_argument,
                       help="built-in architecture (see `offloadkit list`) or model folder")
    synth.add_argument("--hardware", metavar="PROFILE", help="hardware profile file or built-in name")
    synth.add_argument("--vram", metavar="SIZE", type=_size_argument,
                       help="device memory the call may use, e.g. 8GiB (default: the profile's memory less the "
                            "runtime overhead)")
    synth.add_argument("--device", help="device of the policy (default: the profile's, else cuda)")
    synth.add_argument("-o", "--output", type=Path, help="write the policy here, with a `$schema` line relative "
                                                               "to it (default: print it)")
    synth.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    synth.add_argument("--allow-quantize", action="store_true",
                       help="also search `quantize: int8` (it changes numerics; fp8 storage is searched anyway, "
                            "after every policy that keeps the weights as they are)")
    synth.add_argument("--json", action="store_true",
                       help="print the policy's YAML text with its prediction and reasons as JSON")
    _add_call_arguments(synth)

    calibrate = commands.add_parser("calibrate", help="measure this machine and write a hardware profile")
    calibrate.add_argument("--device", default="auto", help="device to measure (default: the accelerator)")
    calibrate.add_argument("-o", "--output", type=Path, help="write the profile here (default: print it)")
    calibrate.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    calibrate.add_argument("--quick", action="store_true", help="small buffers: fast, less exact")
    calibrate.add_argument("--folder", help="where to write the temporary file for the disk read test")

    schema = commands.add_parser(
        "schema", help="print, write or verify the policy JSON Schema",
        description="Print the policy JSON Schema (the default), write it with -o PATH, or check with --check that "
                    "a copy is current. Without -o nothing is written: it never creates a folder where it is run. "
                    "The installed package has its own copy, which `synthesize -o` points at.")
    schema.add_argument("-o", "--output", type=Path, metavar="PATH",
                        help="write the schema to PATH (its folder is created); with --check: the file to check "
                             f"(default there: {DEFAULT_SCHEMA_PATH} in the current folder)")
    schema.add_argument("--print", dest="print_schema", action="store_true",
                        help="print the schema to standard output (what happens without -o)")
    schema.add_argument("--check", action="store_true",
                        help="fail (exit 1) if the file is missing or not what this offloadkit writes")

    listing = commands.add_parser("list", help="list the built-in policies, architectures and hardware profiles")
    listing.add_argument("--json", action="store_true", help="print them as JSON")

    demo = commands.add_parser("demo", help="apply a policy to a tiny built-in SDXL pipeline and show what moved")
    demo.add_argument("--device", default="cpu", help="execution device (default: cpu)")
    demo.add_argument("--policy", default="diffusers-default", help="policy file or built-in name")
    demo.add_argument("--pipeline", default="sdxl", choices=("sd", "sdxl", "sd3", "controlnet"),
                      help="tiny pipeline (default: sdxl)")
    demo.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                      help="the tiny pipeline's dtype (default: fp32; fp16 for policies written for half "
                           "precision, such as examples/sdxl-fp8-int8.yaml)")
    return parser


class _Commands:
    """The subparsers action, giving every command -v/-q too (`offloadkit explain ... -q` as well as
    `offloadkit -q explain ...`)."""

    def __init__(self, action):
        self._action = action

    def __getattr__(self, name):
        return getattr(self._action, name)

    def __setattr__(self, name, value):
        if name == "_action":
            object.__setattr__(self, name, value)
        else:
            setattr(self._action, name, value)

    def add_parser(self, name, **kwargs):
        parser = self._action.add_parser(name, **kwargs)
        _add_output_arguments(parser, on_top=False)
        return parser


def _add_output_arguments(parser, *, on_top: bool) -> None:
    # a command's own -v/-q must not reset the top-level one to False when absent: SUPPRESS leaves it as it was
    default = False if on_top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="also show other libraries' log lines and warnings (hidden by default)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")


def _add_call_arguments(parser) -> None:
    call = parser.add_argument_group("the call (defaults: the pipeline family's usual size, 30 steps, the dtype "
                                     "the model ships in)")
    call.add_argument("--height", type=_positive, help="image height in pixels")
    call.add_argument("--width", type=_positive, help="image width in pixels")
    call.add_argument("--frames", type=_positive, help="video frames (video pipelines)")
    call.add_argument("--steps", type=_positive, default=30, help="denoising steps (default: 30)")
    call.add_argument("--batch", type=_positive, default=1, help="images per call (default: 1)")
    call.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                      help="weights' dtype (default: the model's own: bf16 for FLUX, SD3.5 and Wan, fp16 for SD 1.5 "
                      "and SDXL and for folders that do not say)")
    call.add_argument("--no-guidance", action="store_true", help="no classifier-free guidance (guidance_scale 1)")
    call.add_argument("--headroom", metavar="SIZE|SHARE", type=_share_argument,
                      help="device memory and host RAM kept free, e.g. 10%% or 2GiB (default: the hardware "
                           "profile's: 5%% of the device, 10%% of host RAM)")
    call.add_argument("--negative-prompt", action="store_true", help="a negative prompt is given")


def _pipeline_argument(text: str) -> str:
    # '' would be skipped as "no pipeline" by validate, and read as the current folder by the others
    if not text.strip():
        raise argparse.ArgumentTypeError("empty pipeline name. Give a diffusers pipeline class (e.g. "
                                         "StableDiffusionXLPipeline), a built-in architecture (see `offloadkit "
                                         "list`) or a model folder")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def _share_argument(text: str) -> str:
    from .units import parse_share

    try:
        parse_share(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _size_argument(text: str) -> int:
    from .units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _call_settings(args):
    from .prediction.schedule import CallSettings

    return CallSettings(height=args.height, width=args.width, steps=args.steps, batch=args.batch,
                        guidance=not args.no_guidance, negative_prompt=args.negative_prompt,
                        num_frames=args.frames, dtype=args.dtype)


def _is_model_source(text: str) -> bool:
    """A built-in architecture or a model folder (as opposed to a pipeline class name)."""
    from .prediction.sizing import architecture_names

    return text in architecture_names() or Path(text).expanduser().exists()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import progress

    debug = bool(os.environ.get("OFFLOADKIT_DEBUG"))
    was_enabled = progress.enabled
    if args.quiet:
        progress.enabled = False
    try:
        with _library_noise(shown=args.verbose or debug):
            return _COMMANDS[args.command](args)
    except OffloadkitError as exc:
        return _fail(args, str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `offloadkit list | head`: the reader left; nothing to report to it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_FAILED
    except Exception as exc:  # a bug or an environment problem: say so in one line, not a traceback
        if debug:
            raise
        return _fail(args, f"internal {type(exc).__name__}: {exc}. This is a bug in offloadkit or a broken "
                     "install: please report it with the command and `offloadkit --version` (OFFLOADKIT_DEBUG=1 "
                     "shows the traceback)", EXIT_INTERNAL)
    finally:
        progress.enabled = was_enabled  # main() is also called in-process (tests, scripts)


def _fail(args, message: str, code: int) -> int:
    """Report a failure on standard error, and with --json as the command's JSON too; return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        _print_json(args, {"error": message, "exit_code": code})
    return code


def _print_json(args, data: dict) -> None:
    print(json.dumps({"version": JSON_VERSION, "command": args.command, **data}, indent=2))


@contextmanager
def _library_noise(*, shown: bool):
    """Hide other libraries' log records and warnings (set before they are imported), unless `shown`.

    offloadkit's own warnings (a budget exceeded, a failed undo) stay; everything is put back afterwards, as
    main() also runs in-process."""
    if shown:
        yield
        return
    import logging
    import warnings

    from .errors import BudgetWarning

    # transformers and diffusers read these when imported, and reset their loggers' levels from them
    environment = {name: os.environ.get(name) for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    for name in environment:
        os.environ.setdefault(name, "error")
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"offloadkit(\.|$)")
            warnings.filterwarnings("default", category=BudgetWarning)  # attributed to the pipeline's code
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)


def _validate(args) -> int:
    from .policy.loading import load

    if args.hardware and not (args.pipeline and _is_model_source(args.pipeline)):
        return _fail(args, "--hardware predicts memory, which needs sizes: give --pipeline as a built-in architecture "
                     "(see `offloadkit list`) or a model folder", EXIT_USAGE)
    hardware = None
    if args.hardware:
        from .prediction.hardware import load_hardware

        try:
            hardware = load_hardware(args.hardware)
        except OffloadkitError as exc:
            return _fail(args, f"--hardware: {exc}", EXIT_USAGE)
    results = []
    spec = None
    for name in args.files:
        result = {"file": name, "valid": True, "problems": [], "fits": None, "limits": []}
        results.append(result)
        try:
            policy = load(name)
            if hardware is not None:
                problem, checks = _hardware_problem(policy, hardware, args)
                result["fits"] = all(c.fits for c in checks)
                result["limits"] = [c.to_dict() for c in checks]
                if problem:
                    result["valid"] = False
                    result["problems"] = [_problem_dict(name, f"{name}: {problem}")]
                    if not args.json:
                        print(f"{name}: {problem}", file=sys.stderr)
                        for check in checks:
                            print(f"  {check.line()}", file=sys.stderr)
                    continue
            elif args.pipeline:
                spec = spec or _spec_for(args.pipeline, args.dtype)
                from .plans.resolve import resolve

                resolve(policy, spec, policy.device)  # names only: the device is not needed
        except OffloadkitError as exc:
            result["valid"] = False
            result["problems"], left_off = _problems_of(name, exc)
            if left_off:
                result["problems_left_off"] = left_off
            if not args.json:
                print(str(exc), file=sys.stderr)
            continue
        if not args.json:
            target = f" for {args.pipeline}" if args.pipeline else ""
            target += f" on {args.hardware}" if args.hardware else ""
            print(f"{name}: valid{target}")
            for check in checks if hardware is not None else ():
                print(f"  {check.line()}")
    valid = all(r["valid"] for r in results)
    if args.json:
        _print_json(args, {"valid": valid, "pipeline": args.pipeline, "hardware": args.hardware, "files": results})
    return EXIT_OK if valid else EXIT_FAILED


def _problems_of(name: str, exc: OffloadkitError) -> tuple[list[dict], int]:
    """An error's problems as JSON (located ones with file, line, column and key path), and how many are left off."""
    from .errors import MAX_LISTED, LocatedError

    if not isinstance(exc, LocatedError):
        return [_problem_dict(name, str(exc))], 0
    problems = [{"source": p.source, "line": p.line, "column": p.column, "path": p.dotted_path or None,
                 "message": p.message} for p in exc.problems[:MAX_LISTED]]
    return problems, max(0, len(exc.problems) - MAX_LISTED)


def _problem_dict(name: str, message: str) -> dict:
    return {"source": name, "line": None, "column": None, "path": None, "message": message}


def _hardware_problem(policy, hardware, args):
    """(why the policy's predicted call does not fit the hardware's limits or its own budget, or None;
    the check of every limit)."""
    from .prediction.limits import binding
    from .prediction.replay import predict
    from .units import format_bytes

    prediction = predict(args.pipeline, policy, hardware=hardware, settings=_call_settings(args),
                         headroom=args.headroom)
    checks = prediction.limits
    over = binding(checks)
    if over:
        stages = ", ".join(f"{s.stage} {format_bytes(s.device_peak_bytes)}" for s in prediction.stages)
        return (f"does not fit {hardware.name}: " + "; ".join(c.message() for c in over)
                + f" (device peak per stage: {stages}). Offload more (see `offloadkit synthesize`), put large "
                "models on `disk`, or lower the resolution or batch"), checks
    if policy.budget is not None and prediction.weights_peak_bytes > policy.budget.device_memory:
        return (f"predicted to hold {format_bytes(prediction.weights_peak_bytes)} of weights on the device at once, "
                f"over its own budget of {format_bytes(policy.budget.device_memory)}. Offload more or raise "
                "`budget.device_memory`"), checks
    return None, checks


def _spec_for(pipeline: str, dtype: str | None = None):
    """Names of a pipeline class, or sizes too for an architecture or a model folder (in `dtype`, else its own)."""
    if _is_model_source(pipeline):
        from .prediction.sizing import shipped_dtype, spec_from_folder

        return spec_from_folder(pipeline, dtype=dtype or shipped_dtype(pipeline))  # as `plan` sizes them
    return _class_spec(pipeline)


def _class_spec(class_name: str):
    from .plans.pipeline_spec import spec_from_class

    return spec_from_class(class_name)


def _explain(args) -> int:
    from dataclasses import replace

    from .device import device_label
    from .plans.resolve import resolve
    from .policy.loading import load

    policy = load(args.policy)
    spec = _spec_for(args.pipeline, args.dtype)  # an architecture or model folder also gives sizes
    plan = resolve(policy, spec, device_label(args.device or policy.device))
    if not spec.from_instance and not _is_model_source(args.pipeline):
        plan = replace(plan, notes=(*plan.notes, *_optional_component_notes(args.pipeline, plan)))
    if args.json:
        _print_json(args, plan.to_dict())
    else:
        print(plan)
    return EXIT_OK


def _optional_component_notes(class_name: str, plan) -> list[str]:
    """What a plan made from a class alone cannot know: whether its optional models are in a checkpoint. Where
    built-in architectures of that class exist, their model_index.json is the checkpoint's truth: name what they
    lack; else name every optional model the plan assumes."""
    from .plans.pipeline_spec import resolve_pipeline_class
    from .prediction.sizing import architecture_names, read_model_index

    optional = set(getattr(resolve_pipeline_class(class_name), "_optional_components", None) or ())
    assumed = [c.name for c in plan.components if c.name in optional]
    if not assumed:
        return []
    notes, matched, lacking = [], False, {}
    for architecture in architecture_names():
        pipeline, components = read_model_index(architecture)
        if pipeline == class_name:
            matched = True
            absent = tuple(name for name in assumed if components.get(name) is None)
            if absent:
                lacking.setdefault(absent, []).append(architecture)
    for absent, architectures in lacking.items():
        what = ", ".join(absent)
        which = (f"the hub checkpoint of the built-in architecture {architectures[0]!r} has" if len(architectures) == 1
                 else "the hub checkpoints of the built-in architectures "
                 + ", ".join(repr(a) for a in architectures) + " have")
        notes.append(f"{what}: optional in {class_name}, so from the class alone the plan assumes {_them(absent)} "
                     f"loaded; {which} no {what}: `--pipeline {architectures[0]}` plans what a pipeline loaded from "
                     "it has")
    if not matched:
        notes.append(f"{', '.join(assumed)}: optional in {class_name}, so from the class alone the plan assumes "
                     f"{_them(assumed)} loaded; a checkpoint without {'it' if len(assumed) == 1 else 'them'} "
                     "leaves it out of the chain: give --pipeline its model folder for that checkpoint's plan")
    return notes


def _them(names) -> str:
    return "it is" if len(names) == 1 else "they are"


def _plan(args) -> int:
    from .prediction.replay import predict

    hardware = None
    if args.hardware:
        from .prediction.hardware import load_hardware

        hardware = load_hardware(args.hardware)
    prediction = predict(args.pipeline, args.policy, hardware=hardware, settings=_call_settings(args),
                         device=args.device, headroom=args.headroom)
    if args.json:
        _print_json(args, prediction.to_dict())
    else:
        print(prediction)
    return EXIT_FAILED if prediction.fits is False else EXIT_OK


def _synthesize(args) -> int:
    from dataclasses import replace

    from .policy.schema import with_schema_comment
    from .prediction.synthesis import synthesize

    if args.hardware is None and args.vram is None:
        return _fail(args, "synthesize needs a memory limit: --hardware PROFILE and/or --vram SIZE", EXIT_USAGE)
    if args.output is not None and args.output.exists() and not args.force:
        return _fail(args, f"{args.output} exists; it was left as it is. Choose another --output or add --force",
                     EXIT_FAILED)
    result = synthesize(args.pipeline, hardware=args.hardware, budget=args.vram, settings=_call_settings(args),
                        device=args.device, allow_quantize=args.allow_quantize, headroom=args.headroom)
    if args.output is not None:
        # the `$schema` line can point at the installed schema only once the file's place is known
        result = replace(result, text=with_schema_comment(result.text, args.output))
        result.write(args.output, overwrite=args.force)
    if args.json:
        _print_json(args, {"output": None if args.output is None else str(args.output),
                           "name": result.policy.name, "policy": result.text,
                           "limit_bytes": result.limit_bytes, "candidates": result.candidates,
                           "fitting": result.fitting, "reasons": result.reasons,
                           "prediction": result.prediction.to_dict()})
    elif args.output is None:
        print(result.text, end="")
    else:
        from .units import format_bytes

        print(f"wrote {args.output}: {result.prediction.policy}, predicted peak "
              f"{format_bytes(result.prediction.device_peak_bytes)} within {format_bytes(result.limit_bytes)}")
    return EXIT_OK


def _calibrate(args) -> int:
    from .prediction.calibrate import calibrate
    from .prediction.hardware import dump_hardware_yaml

    if args.output is not None and args.output.exists() and not args.force:
        print(f"error: {args.output} exists; it was left as it is. Choose another --output or add --force",
              file=sys.stderr)
        return 1
    if args.output is not None and not args.output.parent.is_dir():  # before 10-20 s of measuring
        print(f"error: {args.output.parent} is not a folder. Choose another --output", file=sys.stderr)
        return 1
    text = dump_hardware_yaml(calibrate(args.device, quick=args.quick, folder=args.folder))
    if args.output is None:
        print(text, end="")
        return 0
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {args.output} ({exc.strerror or exc}). Choose another --output", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


def _schema(args) -> int:
    from .policy.schema import json_schema_text

    if args.print_schema and (args.output is not None or args.check):
        print("error: --print prints the schema; it cannot be combined with -o/--output or --check. Use one",
              file=sys.stderr)
        return EXIT_USAGE
    text = json_schema_text()
    if args.check:
        path: Path = args.output or DEFAULT_SCHEMA_PATH
        if not path.is_file():
            print(f"{path}: missing. Run `offloadkit schema -o {path}` to write it", file=sys.stderr)
            return EXIT_FAILED
        try:
            current = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            print(f"{path}: cannot read it ({exc}). Run `offloadkit schema -o {path}` to write it again",
                  file=sys.stderr)
            return EXIT_FAILED
        if current != text:
            print(f"{path}: stale (the policy models changed). Run `offloadkit schema -o {path}` and commit the "
                  "result", file=sys.stderr)
            return EXIT_FAILED
        print(f"{path}: up to date")
        return EXIT_OK
    if args.output is None:  # printing by default: a bare command never creates files where it is run
        print(text, end="")
        return EXIT_OK
    path = args.output
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot write it ({exc.strerror or exc}). Choose another --output", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {path}")
    return EXIT_OK


def _list(args) -> int:
    from .policy.capabilities import LIMITS, capability_rows, format_capabilities
    from .policy.backends import BACKENDS
    from .policy.loading import builtin_policies, load
    from .prediction.hardware import hardware_names, load_hardware
    from .prediction.sizing import architecture_names, read_model_index

    policies = [(name, load(name).description or "") for name in builtin_policies()]
    architectures = [(name, read_model_index(name)[0]) for name in architecture_names()]
    profiles = [(name, load_hardware(name).description or "") for name in hardware_names()]
    if args.json:
        _print_json(args, {
            "policies": [{"name": n, "description": d} for n, d in policies],
            "architectures": [{"name": n, "pipeline": p} for n, p in architectures],
            "hardware": [{"name": n, "description": d} for n, d in profiles],
            "quantization": {
                "backends": [{"key": key, "name": BACKENDS[key], "strategies": cells}
                             for key, cells in capability_rows()],
                "limits": [{"backend": lim.backend, "strategy": lim.rule.name,
                            "options": {k: list(v) for k, v in lim.options.items()}, "only_with": lim.gate or None,
                            "reason": lim.reason, "instead": lim.alternative, "source": lim.seen}
                           for lim in LIMITS],
            },
        })
        return EXIT_OK
    print("policies (POLICY):")
    for name, description in policies:
        print(f"  {name:<22} {description}")
    print("\narchitectures (--pipeline MODEL of plan, synthesize, validate --hardware):")
    for name, pipeline in architectures:
        print(f"  {name:<22} {pipeline}")
    print("\nhardware profiles (--hardware PROFILE; nominal values):")
    for name, description in profiles:
        print(f"  {name:<22} {description}")
    print("\nquantization backends (the policy's `quantization` keys) x strategies:")
    for line in format_capabilities().splitlines():
        print(f"  {line}" if line else "")
    return EXIT_OK


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, policy=args.policy, pipeline=args.pipeline, dtype=args.dtype)


_COMMANDS = {"validate": _validate, "explain": _explain, "plan": _plan, "synthesize": _synthesize,
             "calibrate": _calibrate, "schema": _schema, "list": _list, "demo": _demo}


if __name__ == "__main__":
    sys.exit(main())
