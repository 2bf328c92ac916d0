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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offloadkit",
        description="Declarative offload policies for diffusers pipelines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    validate = commands.add_parser("validate", help="check policy files (exit 0 valid, 1 invalid, 2 usage)")
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy files or built-in names")
    validate.add_argument("--pipeline", metavar="CLASS",
                          help="also check component names against this diffusers pipeline class")

    explain = commands.add_parser("explain", help="print the plan of a policy for a pipeline class (no weights)")
    explain.add_argument("policy", metavar="POLICY", help="policy file or built-in name")
    explain.add_argument("--pipeline", metavar="CLASS", required=True, help="diffusers pipeline class name")
    explain.add_argument("--device", help="override the policy's device (shown as given)")
    explain.add_argument("--json", action="store_true", help="print plan.to_dict() as JSON")

    schema = commands.add_parser("schema", help="write or verify the policy JSON Schema")
    schema.add_argument("--check", action="store_true", help="fail if the file is missing or stale")
    schema.add_argument("--output", type=Path, default=DEFAULT_SCHEMA_PATH,
                        help=f"schema file (default: {DEFAULT_SCHEMA_PATH})")

    commands.add_parser("list", help="list the built-in policies")

    demo = commands.add_parser("demo", help="apply a policy to a tiny built-in SDXL pipeline and show what moved")
    demo.add_argument("--device", default="cpu", help="execution device (default: cpu)")
    demo.add_argument("--policy", default="diffusers-default", help="policy file or built-in name")
    demo.add_argument("--pipeline", default="sdxl", choices=("sd", "sdxl", "sd3", "controlnet"),
                      help="tiny pipeline (default: sdxl)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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
    from .loading import load

    failed = 0
    spec = None
    for name in args.files:
        try:
            policy = load(name)
            if args.pipeline:
                spec = spec or _class_spec(args.pipeline)
                from .resolve import resolve

                resolve(policy, spec, policy.device)  # names only: the device is not needed
        except OffloadkitError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
            continue
        target = f" for {args.pipeline}" if args.pipeline else ""
        print(f"{name}: valid{target}")
    return 1 if failed else 0


def _class_spec(class_name: str):
    from .pipeline_spec import spec_from_class

    return spec_from_class(class_name)


def _explain(args) -> int:
    from .loading import load
    from .resolve import resolve

    policy = load(args.policy)
    spec = _class_spec(args.pipeline)
    from .device import device_label

    plan = resolve(policy, spec, device_label(args.device or policy.device))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def _schema(args) -> int:
    from .schema import json_schema_text

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
    from .loading import builtin_policies, load

    for name in builtin_policies():
        policy = load(name)
        print(f"{name:<22} {policy.description or ''}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, policy=args.policy, pipeline=args.pipeline)


_COMMANDS = {"validate": _validate, "explain": _explain, "schema": _schema, "list": _list, "demo": _demo}


if __name__ == "__main__":
    sys.exit(main())
