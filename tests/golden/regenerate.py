"""Rewrite the golden plans after an intended change: `.venv/bin/python tests/golden/regenerate.py`.

Review the diff before committing: every changed line is a change in what a policy does.
"""

import json
from pathlib import Path

import offloadkit
from offloadkit.testing import tiny_pipeline

CASES = [("sdxl", "vae-resident"), ("controlnet", "diffusers-default")]

if __name__ == "__main__":
    here = Path(__file__).parent
    for name, policy in CASES:
        plan = offloadkit.plan(tiny_pipeline(name), policy, device="cpu")
        (here / f"{name}-{policy}.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"wrote {name}-{policy}.json")
