"""Rewrite the golden plans and predictions after an intended change: `.venv/bin/python tests/golden/regenerate.py`.

Review the diff before committing: every changed line is a change in what a policy does, or in
what offloadkit predicts it costs (memory per stage, bytes moved, transfer time).
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

if __name__ == "__main__":
    here = Path(__file__).parent
    for name, policy in CASES:
        plan = offloadkit.plan(tiny_pipeline(name), policy, device="cpu")
        (here / f"{name}-{policy}.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"wrote {name}-{policy}.json")
    (here / "predictions").mkdir(exist_ok=True)
    for architecture in architecture_names():
        path = here / "predictions" / f"{architecture}.json"
        path.write_text(json.dumps(golden_predictions(architecture), indent=2, sort_keys=True) + "\n")
        print(f"wrote predictions/{architecture}.json")
