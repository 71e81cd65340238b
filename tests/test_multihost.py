"""When `maybe_initialize_distributed` starts distributed JAX, decided from made-up
environments; `jax.distributed.initialize` itself is replaced by a recorder."""

import logging

import jax
import pytest

from sqllava_jax.parallel import multihost
from sqllava_jax.parallel.multihost import plan_distributed

# What `srun` sets in each task of a 2-node x 8-GPU step.
SRUN_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]",
             "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
EXPLICIT = {"SQLLAVA_COORDINATOR": "10.0.0.1:1234", "SQLLAVA_NUM_PROCESSES": "2",
            "SQLLAVA_PROCESS_ID": "1"}


def no_tpu():
  return 0


def plan(env, tpu=no_tpu, **kwargs):
  return plan_distributed(env=env, tpu_processes=tpu, **kwargs)


def test_single_process_by_default():
  p = plan({})
  assert (p.source, p.initialize) == ("single", False)


def test_explicit_environment():
  p = plan(EXPLICIT)
  assert p.initialize and p.source == "explicit"
  assert (p.coordinator_address, p.num_processes, p.process_id) == ("10.0.0.1:1234", 2, 1)
  # Nothing for JAX to detect: it must not go looking for a cluster.
  assert p.cluster_detection_method == "deactivate"


def test_arguments_beat_environment():
  p = plan(EXPLICIT, coordinator_address="host:9", num_processes=4, process_id=3)
  assert (p.coordinator_address, p.num_processes, p.process_id) == ("host:9", 4, 3)


def test_jax_coordinator_variable_is_honoured():
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "SQLLAVA_NUM_PROCESSES": "2",
         "SQLLAVA_PROCESS_ID": "0"}
  assert plan(env).coordinator_address == "h:1"


def test_one_process_wins_over_a_cluster():
  p = plan({**SRUN_STEP, "SQLLAVA_NUM_PROCESSES": "1"}, tpu=lambda: 4)
  assert (p.source, p.initialize) == ("single", False)


def test_slurm_step_with_many_tasks():
  p = plan(SRUN_STEP)
  assert p.initialize and p.source == "slurm"
  assert p.cluster_detection_method == "slurm"
  # JAX reads rank, count and coordinator from SLURM itself.
  assert (p.coordinator_address, p.num_processes, p.process_id) == (None, None, None)


def test_slurm_step_with_one_task():
  assert not plan({**SRUN_STEP, "SLURM_NTASKS": "1"}).initialize


def test_slurm_batch_script_without_srun_warns(caplog):
  env = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NODELIST"}
  with caplog.at_level(logging.WARNING, logger=multihost.__name__):
    p = plan(env)
  assert not p.initialize
  assert "not in an srun step" in caplog.text


def test_ssh_into_an_allocated_node():
  # Only some SLURM variables (jax-ml/jax#30073): one process, no KeyError.
  assert not plan({"SLURM_JOB_ID": "4242"}).initialize


def test_slurm_with_explicit_coordinator_port():
  p = plan({**SRUN_STEP, "SQLLAVA_COORDINATOR": "gpu001:5555"})
  assert (p.source, p.coordinator_address, p.num_processes) == ("slurm", "gpu001:5555", None)
  assert p.cluster_detection_method == "slurm"


def test_tpu_slice():
  p = plan({}, tpu=lambda: 4)
  assert p.initialize and p.source == "tpu"
  assert p.cluster_detection_method is None  # JAX picks its GCE or GKE TPU variant
  assert not plan({}, tpu=lambda: 1).initialize


def test_tpu_count_off_tpu_is_zero():
  assert multihost.tpu_process_count() == 0


@pytest.mark.parametrize("env, kwargs, message", [
    ({"SQLLAVA_NUM_PROCESSES": "2"}, {}, "SQLLAVA_COORDINATOR"),
    ({"SQLLAVA_COORDINATOR": "h:1"}, {}, "SQLLAVA_NUM_PROCESSES"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2}, "SQLLAVA_PROCESS_ID"),
    ({"SQLLAVA_NUM_PROCESSES": "two"}, {}, "SQLLAVA_NUM_PROCESSES='two' is not an integer"),
    ({"SQLLAVA_NUM_PROCESSES": "0"}, {}, "must be >= 1"),
    ({**EXPLICIT, "SQLLAVA_PROCESS_ID": "2"}, {}, "must be in 0..1"),
    ({**EXPLICIT, "SQLLAVA_COORDINATOR": "10.0.0.1"}, {}, "host:port"),
])
def test_bad_explicit_settings(env, kwargs, message):
  with pytest.raises(ValueError, match=message):
    plan(env, **kwargs)


@pytest.fixture
def fake_jax(monkeypatch):
  """Clean environment, fresh module state, and a recorder in place of initialize."""
  for key in list(multihost.os.environ):
    if key.startswith(("SLURM_", "SQLLAVA_", "TPU_")) or key == "JAX_COORDINATOR_ADDRESS":
      monkeypatch.delenv(key)
  monkeypatch.setattr(multihost, "_STATE", {})
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  return calls


def test_initializes_once(fake_jax, monkeypatch):
  for key, value in SRUN_STEP.items():
    monkeypatch.setenv(key, value)
  first = multihost.maybe_initialize_distributed()
  second = multihost.maybe_initialize_distributed()
  assert fake_jax == [dict(coordinator_address=None, num_processes=None, process_id=None,
                           cluster_detection_method="slurm")]
  assert second is first


def test_explicit_arguments_reach_jax(fake_jax):
  multihost.maybe_initialize_distributed("10.0.0.1:1234", 2, 0)
  assert fake_jax == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0,
                           cluster_detection_method="deactivate")]


def test_single_process_is_a_no_op(fake_jax):
  assert multihost.maybe_initialize_distributed().source == "single"
  assert fake_jax == []


def test_already_initialized_by_caller(fake_jax, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setenv("SQLLAVA_NUM_PROCESSES", "2")  # would be an error if it were read
  assert multihost.maybe_initialize_distributed().source == "already"
  assert fake_jax == []
