"""The training loop: set-up, restore, step, log, save.

`Trainer(cfg).run()` trains `cfg` into `cfg.output_dir`, resuming from the newest intact
checkpoint there (newer, damaged ones are named and set aside). Every process runs the same
code on its shard of the data; process 0 writes the logs and holds the output directory's run
lock, so a second run on it refuses at once. SIGTERM (preemption on TPU and SLURM) saves a
checkpoint and returns normally. A failed save stops the run, or with
`train.on_save_error: continue` is reported and training goes on.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
from tqdm import tqdm

from sqllava_jax import configlib
from sqllava_jax.config import Config
from sqllava_jax.data.pipeline import make_pipeline
from sqllava_jax.parallel.mesh import make_mesh
from sqllava_jax.training.checkpoint import Checkpointer, CheckpointSaveError
from sqllava_jax.training.logger import MetricsLogger, plot_loss_curve, read_metrics
from sqllava_jax.training.on_main import on_main
from sqllava_jax.training.program import TrainProgram
from sqllava_jax.training.run_lock import OutputDirLockedError, RunLock

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient with `train.nonfinite: stop` (a checkpoint was saved)."""


class Trainer:
  def __init__(self, cfg: Config, *, mesh=None):
    self.cfg = cfg
    self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    self.rows_per_step = (cfg.train.per_device_batch_size * local_devices
                          * cfg.train.grad_accum_steps)
    self.is_main = jax.process_index() == 0
    self.lock = self._lock_output_dir()
    try:
      self._build_pipeline()
      self.program = TrainProgram(cfg, self.mesh, self.total_steps)
      self.ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"),
                               save_every=cfg.train.save_every, keep=cfg.train.keep_checkpoints,
                               async_save=cfg.train.async_checkpointing)
    except BaseException:
      self.lock.release()
      raise
    self.stop_requested = False
    self.failed_saves: list[int] = []

  # ---- set-up ---------------------------------------------------------------------------
  def _lock_output_dir(self) -> RunLock:
    """Before anything is written there: refuse if a live run holds output_dir."""
    lock = RunLock(self.cfg.output_dir)

    def acquire() -> int:
      lock.acquire()
      return 0

    on_main(acquire, elsewhere=lambda: OutputDirLockedError(
        f"{self.cfg.output_dir} is in use by another run (process 0 names it)"))
    atexit.register(lock.release)
    return lock

  def _build_pipeline(self) -> None:
    forever = self.cfg.train.max_steps > 0
    if self.cfg.data.packing and not forever:
      raise ValueError("data.packing needs train.max_steps > 0: how many packed rows an epoch "
                       "makes is known only after packing it")
    self.pipeline = make_pipeline(self.cfg, batch_size=self.rows_per_step,
                                  num_epochs=0 if forever else None)
    if forever:
      self.total_steps = self.cfg.train.max_steps
    else:
      self.total_steps = self.pipeline.num_records // self.rows_per_step
    if self.total_steps <= 0:
      raise ValueError(f"{self.pipeline.num_records} records make no full step of "
                       f"{self.rows_per_step} rows per process; lower train.per_device_batch_size "
                       "or grad_accum_steps, or set train.max_steps")

  def fresh_state(self) -> dict:
    return self.program.fresh_state(self.cfg.seed)

  def init_or_restore(self) -> tuple[dict, Any]:
    """(state, data iterator): from the newest intact checkpoint in output_dir, else fresh."""
    it = iter(self.pipeline)
    latest, damaged = self.ckpt.newest_intact()
    self._set_aside(damaged)
    if latest is None:
      return self.fresh_state(), it
    a = self.program.abstract_state
    out = self.ckpt.restore(latest, params=a["params"],
                            train={k: a[k] for k in ("opt_state", "step", "rng")}, data_iter=it,
                            verify=False)
    state = {"params": out["params"], **out["train"]}
    self._truncate_logs(latest)
    if self.is_main:
      print(f"resumed from step {latest} in {self.ckpt.directory}", flush=True)
    return state, it

  def _set_aside(self, damaged: list[tuple[int, list[str]]]) -> None:
    """Moves damaged steps out of orbax's sight (so they are saved anew), saying why."""
    moved = self.ckpt.set_aside([step for step, _ in damaged])  # every process: it re-lists
    for (step, problems), where in zip(damaged, moved):
      print(f"skipped step {step} of {self.ckpt.directory}: damaged ({'; '.join(problems)}); "
            f"moved to {where}", file=sys.stderr, flush=True)

  # ---- the loop ---------------------------------------------------------------------------
  def run(self) -> dict:
    """Trains to the end (or SIGTERM) and returns the summary; the run lock is released."""
    try:
      return self._run()
    finally:
      self.lock.release()

  def _run(self) -> dict:
    state, it = self.init_or_restore()
    start = int(jax.device_get(state["step"]))
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    logger = MetricsLogger(self.cfg.output_dir, enabled=self.is_main)
    bar = tqdm(total=self.total_steps, initial=start, disable=not self.is_main, desc="train",
               dynamic_ncols=True)
    t0, step, pending, window = time.time(), start, [], time.time()
    try:
      while step < self.total_steps and not self.stop_requested:
        local = next(it)
        self._record_order(step + 1, local)
        state, metrics = self.program.train_step(state, self.program.global_batch(local))
        step += 1
        pending.append((step, metrics))
        if self.cfg.train.nonfinite == "stop":
          self._stop_if_nonfinite(step, state, it, metrics)
        if step % self.cfg.train.log_every == 0 or step == self.total_steps:
          window = self._flush(pending, logger, bar, it, window)
          pending = []
        if step == self.total_steps or self.ckpt.should_save(step):
          self._save(step, state, it)
      if pending:
        self._flush(pending, logger, bar, it, window)
      if self.stop_requested:
        self._save(step, state, it, wait=True)
      self._wait_for_last_save()
    finally:
      bar.close()
      logger.close()
      self._settle_saves()
      signal.signal(signal.SIGTERM, previous)
    self.state = state
    return self._summary(step, it, time.time() - t0, stopped=self.stop_requested)

  def _on_sigterm(self, signum, frame) -> None:
    self.stop_requested = True

  def _save(self, step: int, state: dict, it, wait: bool = False) -> None:
    """Saves `step`: one of the checkpointer's interval (`train.save_every`), or off it the
    run's last: the final step, or SIGTERM and a non-finite stop (which `wait` for it). A
    failed earlier async save is reported by the first attempt; with `on_save_error:
    continue` this step is then tried once more."""
    if step in self.ckpt.all_steps():  # e.g. SIGTERM right after a scheduled save
      return
    last = wait or step == self.total_steps
    meta = {"config": configlib.to_dict(self.cfg), "step": step,
            "skipped_examples": it.skipped, "total_steps": self.total_steps}
    for _ in range(2):
      try:
        self.ckpt.save(step, params=state["params"], meta=meta,
                       train={k: state[k] for k in ("opt_state", "step", "rng")}, data_iter=it,
                       force=last)
        if wait:
          self.ckpt.wait()
        return
      except CheckpointSaveError as e:
        self._save_failed(e, last=last and e.step == step)
        if e.step == step:
          return

  def _save_failed(self, error: CheckpointSaveError, *, last: bool) -> None:
    """Raises `error` unless training may go on (`on_save_error: continue`, not the last save)."""
    self.failed_saves.append(error.step)
    if last or self.cfg.train.on_save_error == "stop":
      raise error
    if self.is_main:
      print(f"{error}\ntraining goes on (train.on_save_error=continue); the newest saved step "
            f"is {self.ckpt.latest_step()}", file=sys.stderr, flush=True)

  def _wait_for_last_save(self) -> None:
    try:
      self.ckpt.wait()
    except CheckpointSaveError as e:
      self._save_failed(e, last=True)

  def _settle_saves(self) -> None:
    """On the way out of an error, a save in flight finishes; its own failure is printed (the
    error on its way out is the one raised)."""
    try:
      self.ckpt.wait()
    except CheckpointSaveError as e:
      print(e, file=sys.stderr, flush=True)

  def _stop_if_nonfinite(self, step, state, it, metrics) -> None:
    loss, gnorm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      self._save(step, state, it, wait=True)
      raise NonFiniteError(f"step {step}: loss={loss}, grad_norm={gnorm}; the update was skipped "
                           f"and a checkpoint saved in {self.ckpt.directory}")

  def _flush(self, pending, logger, bar, it, window_start) -> float:
    now = time.time()
    fetched = jax.device_get([m for _, m in pending])
    tokens = sum(float(m["tokens"]) for m in fetched)
    skipped_examples = sum(it.skipped.values())
    for (step, _), m in zip(pending, fetched):
      record = {k: float(v) for k, v in m.items()}
      record.update(skipped_examples=skipped_examples,
                    tokens_per_s=tokens / max(now - window_start, 1e-9),
                    lr=record.get(f"lr/{self._main_group()}", 0.0))
      logger.log(step, record)
    last = fetched[-1]
    bar.set_postfix(loss=f"{float(last['loss']):.4f}",
                    lr=f"{float(last.get(f'lr/{self._main_group()}', 0.0)):.2e}",
                    tok_s=f"{tokens / max(now - window_start, 1e-9):.0f}", skipped=skipped_examples)
    bar.update(len(pending))
    return now

  def _main_group(self) -> str:
    trainable = [g.name for g in self.cfg.train.param_groups if not g.frozen]
    return trainable[0] if trainable else ""

  # ---- bookkeeping ------------------------------------------------------------------------
  def _order_path(self) -> str:
    return os.path.join(self.cfg.output_dir, f"data_order.p{jax.process_index()}.jsonl")

  def _record_order(self, step: int, local: dict) -> None:
    os.makedirs(self.cfg.output_dir, exist_ok=True)
    with open(self._order_path(), "a") as f:
      f.write(json.dumps({"step": step, "example_index": local["example_index"].tolist()}) + "\n")

  def _truncate_logs(self, step: int) -> None:
    """Drops records past the restored step, which the resumed run writes again."""
    paths = [self._order_path()] + ([os.path.join(self.cfg.output_dir, "metrics.jsonl")]
                                    if self.is_main else [])
    for path in paths:
      if os.path.exists(path):
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        with open(path, "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in kept)

  def _summary(self, step: int, it, wall: float, *, stopped: bool) -> dict:
    metrics_path = os.path.join(self.cfg.output_dir, "metrics.jsonl")
    records = read_metrics(metrics_path) if self.is_main and os.path.exists(metrics_path) else []
    png = (plot_loss_curve(records, os.path.join(self.cfg.output_dir, "loss.png"))
           if records else None)
    summary = {"steps": step, "total_steps": self.total_steps, "stopped_early": stopped,
               "final_loss": records[-1]["loss"] if records else None, "wall_s": round(wall, 2),
               "skipped_examples": it.skipped, "loss_curve": png,
               "failed_saves": self.failed_saves,
               "skipped_updates": records[-1].get("skipped_updates") if records else None}
    if self.is_main:
      print(it.skip_summary(), flush=True)
    return summary
