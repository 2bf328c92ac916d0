"""The pre-commit hooks of .pre-commit-hooks.yaml, run for real by `pre-commit try-repo` on a scratch repository.

The `language: system` hook is the one run: it uses this offloadkit, so nothing (torch!) is installed. The
hooks file is committed into a scratch hooks repository of its own, because try-repo reads a repository's
committed (or staged) files, and this checkout's state is not the test's to change.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / ".pre-commit-hooks.yaml"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="pre-commit needs git")


def _git(*arguments, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    "-c", "init.defaultBranch=main", *arguments], cwd=cwd, check=True, capture_output=True)


def test_hooks_file_declares_both_hooks_with_the_same_files():
    hooks = {hook["id"]: hook for hook in yaml.safe_load(HOOKS.read_text())}
    assert set(hooks) == {"offloadkit-validate", "offloadkit-validate-system"}
    assert hooks["offloadkit-validate"]["language"] == "python"
    assert hooks["offloadkit-validate-system"]["language"] == "system"
    assert {h["entry"] for h in hooks.values()} == {"offloadkit validate"}
    assert hooks["offloadkit-validate"]["files"] == hooks["offloadkit-validate-system"]["files"]


def test_files_pattern_takes_policy_files_and_leaves_other_yaml():
    import re

    pattern = re.compile(yaml.safe_load(HOOKS.read_text())[0]["files"])
    for path in ("policy.yaml", "sdxl-policy.yaml", "cfg/sdxl.policy.yml", "policies/sdxl-8gb.yaml",
                 "a/policies/b/c.yaml"):
        assert pattern.search(path), path
    for path in (".github/workflows/ci.yml", "hardware/rtx-4090-24gb.yaml", "docker-compose.yaml", "policy.json"):
        assert not pattern.search(path), path


def test_try_repo_passes_a_good_policy_and_fails_a_bad_one(tmp_path):
    pytest.importorskip("pre_commit")
    hooks_repo = tmp_path / "hooks"
    hooks_repo.mkdir()
    shutil.copy(HOOKS, hooks_repo / ".pre-commit-hooks.yaml")
    _git("init", "-q", cwd=hooks_repo)
    _git("add", ".", cwd=hooks_repo)
    _git("commit", "-q", "-m", "hooks", cwd=hooks_repo)

    project = tmp_path / "project"
    (project / "policies").mkdir(parents=True)
    (project / "policies" / "good.yaml").write_text("version: 1\nextends: diffusers-default\n")
    (project / "policies" / "bad.yaml").write_text("version: 1\nsequnce: auto\n")
    (project / "ci.yml").write_text("not: [a, policy]\n")  # other YAML: not passed to the hook
    _git("init", "-q", cwd=project)
    _git("add", ".", cwd=project)

    # the `offloadkit` of this Python first on PATH: what `language: system` runs
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "PRE_COMMIT_HOME": str(tmp_path / "cache"), "PRE_COMMIT_COLOR": "never"}
    result = subprocess.run([sys.executable, "-m", "pre_commit", "try-repo", str(hooks_repo),
                             "offloadkit-validate-system", "--all-files", "--verbose"],
                            cwd=project, env=environment, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "policies/good.yaml: valid" in output
    assert "policies/bad.yaml:2:1 sequnce: unknown key" in output
    assert "ci.yml" not in output.split("offloadkit validate (installed offloadkit)", 1)[1]

    (project / "policies" / "bad.yaml").unlink()
    _git("add", "-A", cwd=project)
    result = subprocess.run([sys.executable, "-m", "pre_commit", "try-repo", str(hooks_repo),
                             "offloadkit-validate-system", "--all-files"],
                            cwd=project, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
