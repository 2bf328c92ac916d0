"""Rewrite the golden plans and predictions after an intended change: `.venv/bin/python tests/golden/regenerate.py`.

Review the diff before committing: every changed line is a change in what a policy does, or in
what offloadkit predicts it costs (memory per stage, bytes moved, transfer time).

`regenerate.py cli` rewrites only the CLI's --json goldens (tests/golden/cli/, the cases of
tests/test_cli_json.py, masked as that test compares them): a changed key there is a change for every
script that reads the output.
"""

import json
import sys
from pathlib import Path

import offloadkit
from offloadkit.prediction.sizing import architecture_names
from offloadkit.testing import tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import golden_predictions  # noqa: E402

CASES = [("sdxl", "vae-resident"), ("controlnet", "diffusers-default")]

def regenerate_cli(here: Path) -> None:
    import contextlib
    import io
    import os

    from offloadkit.cli import main
    from test_cli_json import CLI_CASES, ROOT, masked

    (here / "cli").mkdir(exist_ok=True)
    os.chdir(ROOT)  # the cases' paths are relative to the repository root
    for name, (arguments, code) in CLI_CASES.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            got = main(arguments)
        if got != code:
            raise SystemExit(f"`offloadkit {' '.join(arguments)}` exited {got}, expected {code}: fix that first")
        (here / "cli" / f"{name}.json").write_text(json.dumps(masked(json.loads(out.getvalue())), indent=2) + "\n")
        print(f"wrote cli/{name}.json")


if __name__ == "__main__":
    here = Path(__file__).parent
    if sys.argv[1:] == ["cli"]:
        regenerate_cli(here)
        raise SystemExit(0)
    for name, policy in CASES:
        plan = offloadkit.plan(tiny_pipeline(name), policy, device="cpu")
        (here / f"{name}-{policy}.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"wrote {name}-{policy}.json")
    (here / "predictions").mkdir(exist_ok=True)
    for architecture in architecture_names():
        path = here / "predictions" / f"{architecture}.json"
        path.write_text(json.dumps(golden_predictions(architecture), indent=2, sort_keys=True) + "\n")
        print(f"wrote predictions/{architecture}.json")
    regenerate_cli(here)
