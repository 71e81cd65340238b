"""Every `sqllava-jax` and launcher command in the README parses (and launchers dry-run)."""

import os
import re
import shlex
import subprocess

import pytest

from sqllava_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[list[str]]:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for line in block.splitlines():
      for part in line.split("&&"):
        words = shlex.split(part)
        if words:
          commands.append(words)
  return commands


def ours(words):
  return os.path.basename(words[0]) == "sqllava-jax"


def test_the_readme_shows_every_sub_command():
  shown = {w[1] for w in readme_commands() if ours(w)}
  missing = set(cli.COMMANDS) - shown
  assert not missing, f"sub-commands missing from the README: {sorted(missing)}"


@pytest.mark.parametrize("words", [w for w in readme_commands() if ours(w)],
                         ids=lambda w: " ".join(w[1:3]))
def test_sqllava_jax_commands_parse(words):
  args = cli.parse_args(words[1:])
  assert args.command == words[1]


LAUNCHERS = [w for w in readme_commands()
             if any(x.startswith("launch/") for x in w)]


@pytest.mark.parametrize("words", LAUNCHERS,
                         ids=lambda w: next(x for x in w if x.startswith("launch/")))
def test_launcher_commands_dry_run(words):
  i = next(i for i, x in enumerate(words) if x.startswith("launch/"))
  cmd = ["bash", words[i], "--dry-run", *words[i + 1:]]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "SLURM_JOB_ID": "", "TPU_PROJECT": "demo-project"})
  assert proc.returncode == 0, proc.stderr
  assert "sqllava-jax train" in proc.stdout
