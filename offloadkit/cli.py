"""The `offloadkit` command. Argument parsing and printing only; the work lives in the library.

`validate` and `schema` never import torch, so they run in lightweight CI jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import OffloadkitError

DEFAULT_SCHEMA_PATH = Path("schemas") / "policy.schema.json"


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
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="offloadkit's version and those of the libraries it runs on (for bug reports)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    validate = commands.add_parser("validate", help="check policy files (exit 0 valid, 1 invalid, 2 usage)")
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy files or built-in names")
    validate.add_argument("--pipeline", metavar="CLASS|MODEL", type=_pipeline_argument,
                          help="also check component names against this diffusers pipeline class, built-in "
                               "architecture (sdxl, flux1-dev, ...) or model folder")
    validate.add_argument("--hardware", metavar="PROFILE",
                          help="also fail when the predicted peak exceeds this hardware profile's device memory or "
                               "the policy's own budget (needs --pipeline as an architecture or model folder)")
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
    explain.add_argument("--json", action="store_true", help="print plan.to_dict() as JSON")

    plan = commands.add_parser("plan", help="predict memory per stage, bytes moved and transfer time of a call, "
                                            "before loading anything")
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
    synth.add_argument("-o", "--output", type=Path, help="write the policy here (default: print it)")
    synth.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    synth.add_argument("--allow-quantize", action="store_true",
                       help="also search `quantize: int8` (it changes numerics; fp8 storage is searched anyway, "
                            "after every policy that keeps the weights as they are)")
    _add_call_arguments(synth)

    calibrate = commands.add_parser("calibrate", help="measure this machine and write a hardware profile")
    calibrate.add_argument("--device", default="auto", help="device to measure (default: the accelerator)")
    calibrate.add_argument("-o", "--output", type=Path, help="write the profile here (default: print it)")
    calibrate.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    calibrate.add_argument("--quick", action="store_true", help="small buffers: fast, less exact")
    calibrate.add_argument("--folder", help="where to write the temporary file for the disk read test")

    schema = commands.add_parser("schema", help="write or verify the policy JSON Schema")
    schema.add_argument("--check", action="store_true", help="fail if the file is missing or stale")
    schema.add_argument("--output", type=Path, default=DEFAULT_SCHEMA_PATH,
                        help=f"schema file (default: {DEFAULT_SCHEMA_PATH})")

    commands.add_parser("list", help="list the built-in policies, architectures and hardware profiles")

    demo = commands.add_parser("demo", help="apply a policy to a tiny built-in SDXL pipeline and show what moved")
    demo.add_argument("--device", default="cpu", help="execution device (default: cpu)")
    demo.add_argument("--policy", default="diffusers-default", help="policy file or built-in name")
    demo.add_argument("--pipeline", default="sdxl", choices=("sd", "sdxl", "sd3", "controlnet"),
                      help="tiny pipeline (default: sdxl)")
    return parser


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
    # transformers warns about optional backends (torchvision) on import; diffusers and transformers import
    # torchao whenever it is installed, which logs kernels it could not load. Not the user's concern here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not os.environ.get("OFFLOADKIT_DEBUG"):
        import logging

        for noisy in ("torchao", "torch.utils._pytree"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _COMMANDS[args.command](args)
    except OffloadkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an environment problem: say so in one line, not a traceback
        if os.environ.get("OFFLOADKIT_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}. Set OFFLOADKIT_DEBUG=1 for the traceback "
              "and please report it", file=sys.stderr)
        return 1


def _validate(args) -> int:
    from .policy.loading import load

    if args.hardware and not (args.pipeline and _is_model_source(args.pipeline)):
        print("error: --hardware predicts memory, which needs sizes: give --pipeline as a built-in architecture "
              "(see `offloadkit list`) or a model folder", file=sys.stderr)
        return 2
    hardware = None
    if args.hardware:
        from .prediction.hardware import load_hardware

        try:
            hardware = load_hardware(args.hardware)
        except OffloadkitError as exc:
            print(f"error: --hardware: {exc}", file=sys.stderr)
            return 2
    failed = 0
    spec = None
    for name in args.files:
        try:
            policy = load(name)
            if hardware is not None:
                problem = _hardware_problem(policy, hardware, args)
                if problem:
                    failed += 1
                    print(f"{name}: {problem}", file=sys.stderr)
                    continue
            elif args.pipeline:
                spec = spec or _spec_for(args.pipeline, args.dtype)
                from .plans.resolve import resolve

                resolve(policy, spec, policy.device)  # names only: the device is not needed
        except OffloadkitError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
            continue
        target = f" for {args.pipeline}" if args.pipeline else ""
        target += f" on {args.hardware}" if args.hardware else ""
        print(f"{name}: valid{target}")
    return 1 if failed else 0


def _hardware_problem(policy, hardware, args) -> str | None:
    """Why the policy's predicted call does not fit the hardware's limits or its own budget, or None."""
    from .prediction.limits import binding
    from .prediction.replay import predict
    from .units import format_bytes

    prediction = predict(args.pipeline, policy, hardware=hardware, settings=_call_settings(args),
                         headroom=args.headroom)
    over = binding(prediction.limits)
    if over:
        stages = ", ".join(f"{s.stage} {format_bytes(s.device_peak_bytes)}" for s in prediction.stages)
        return (f"does not fit {hardware.name}: " + "; ".join(c.message() for c in over)
                + f" (device peak per stage: {stages}). Offload more (see `offloadkit synthesize`), put large "
                "models on `disk`, or lower the resolution or batch")
    if policy.budget is not None and prediction.weights_peak_bytes > policy.budget.device_memory:
        return (f"predicted to hold {format_bytes(prediction.weights_peak_bytes)} of weights on the device at once, "
                f"over its own budget of {format_bytes(policy.budget.device_memory)}. Offload more or raise "
                "`budget.device_memory`")
    return None


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
    from .policy.loading import load
    from .plans.resolve import resolve

    policy = load(args.policy)
    spec = _spec_for(args.pipeline, args.dtype)  # an architecture or model folder also gives sizes
    from .device import device_label

    plan = resolve(policy, spec, device_label(args.device or policy.device))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def _plan(args) -> int:
    from .prediction.replay import predict

    prediction = predict(args.pipeline, args.policy, hardware=args.hardware, settings=_call_settings(args),
                         device=args.device, headroom=args.headroom)
    print(json.dumps(prediction.to_dict(), indent=2) if args.json else prediction)
    return 0


def _synthesize(args) -> int:
    from .prediction.synthesis import synthesize

    if args.hardware is None and args.vram is None:
        print("error: synthesize needs a memory limit: --hardware PROFILE and/or --vram SIZE", file=sys.stderr)
        return 2
    if args.output is not None and args.output.exists() and not args.force:
        print(f"error: {args.output} exists; it was left as it is. Choose another --output or add --force",
              file=sys.stderr)
        return 1
    result = synthesize(args.pipeline, hardware=args.hardware, budget=args.vram, settings=_call_settings(args),
                        device=args.device, allow_quantize=args.allow_quantize, headroom=args.headroom)
    if args.output is None:
        print(result.text, end="")
        return 0
    result.write(args.output, overwrite=args.force)
    from .units import format_bytes

    print(f"wrote {args.output}: {result.prediction.policy}, predicted peak "
          f"{format_bytes(result.prediction.device_peak_bytes)} within {format_bytes(result.limit_bytes)}")
    return 0


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

    text = json_schema_text()
    path: Path = args.output
    if args.check:
        if not path.is_file():
            print(f"{path}: missing. Run `offloadkit schema` to write it", file=sys.stderr)
            return 1
        try:
            current = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            print(f"{path}: cannot read it ({exc}). Run `offloadkit schema` to write it again", file=sys.stderr)
            return 1
        if current != text:
            print(f"{path}: stale (the policy models changed). Run `offloadkit schema` and commit the result",
                  file=sys.stderr)
            return 1
        print(f"{path}: up to date")
        return 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot write it ({exc.strerror or exc}). Choose another --output", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _list(args) -> int:
    from .policy.loading import builtin_policies, load

    from .policy.capabilities import format_capabilities
    from .prediction.hardware import hardware_names, load_hardware
    from .prediction.sizing import architecture_names, read_model_index

    print("policies (POLICY):")
    for name in builtin_policies():
        print(f"  {name:<22} {load(name).description or ''}")
    print("\narchitectures (--pipeline MODEL of plan, synthesize, validate --hardware):")
    for name in architecture_names():
        print(f"  {name:<22} {read_model_index(name)[0]}")
    print("\nhardware profiles (--hardware PROFILE; nominal values):")
    for name in hardware_names():
        print(f"  {name:<22} {load_hardware(name).description or ''}")
    print("\nquantization backends (the policy's `quantization` keys) x strategies:")
    for line in format_capabilities().splitlines():
        print(f"  {line}" if line else "")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, policy=args.policy, pipeline=args.pipeline)


_COMMANDS = {"validate": _validate, "explain": _explain, "plan": _plan, "synthesize": _synthesize,
             "calibrate": _calibrate, "schema": _schema, "list": _list, "demo": _demo}


if __name__ == "__main__":
    sys.exit(main())
