"""Trainer hooks (RecIS's ``recis.hooks``: ``Hook``, ``LoggerHook``, ``ProfilerHook``,
``HashTableFilterHook``; also importable as ``fxrec.hooks``).

The ``Trainer`` calls every hook, in the order of its ``hooks`` list, at these points::

    before_train(trainer)
      before_epoch(trainer, epoch)                      # each pass over the training data
        before_step(trainer, step)                      # step: the global step about to run (1-based)
        after_step(trainer, step, outputs)              # after the optimizer steps
      after_epoch(trainer, epoch)
      before_evaluate(trainer) / after_evaluate(trainer, results)   # evaluate()
      after_save(trainer, step, path)                   # after a checkpoint is written (path: rank 0's, else None)
    after_train(trainer)

``outputs`` (a dict): ``loss`` (a 0-d tensor, detached: the mean of the step's micro-batch
losses), ``metrics`` (``{name: value}`` the model registered with ``add_metric`` in the step's last
micro-batch, tensors left on their device), ``batch_size`` (rows this rank trained on in the
step) and ``epoch``. Nothing is copied to the host until a hook asks (``float(...)``): a hook
that converts every step syncs the GPU every step.

Every method takes ``*args, **kwargs`` in the base class, so a hook overrides only what it needs.
Hooks run on every rank; the ones that write files write on rank 0 only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch

from fxrec.distributed.env import rank as _rank
from fxrec.distributed.env import world_size as _world_size
from fxrec.utils.logger import Logger

__all__ = ["HashTableFilterHook", "Hook", "LoggerHook", "ProfilerHook", "to_float"]

logger = Logger(__name__)


def to_float(value: Any) -> Any:
    """A metric value as a JSON-able Python value: tensors with one element -> float (others ->
    list), numbers as they are, anything else ``str``."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return float(value) if value.numel() == 1 else value.cpu().tolist()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    return str(value)


class Hook:
    """Base class: every callback is a no-op (module docstring)."""

    def before_train(self, trainer, *args, **kwargs) -> None:
        pass

    def after_train(self, trainer, *args, **kwargs) -> None:
        pass

    def before_epoch(self, trainer, *args, **kwargs) -> None:
        pass

    def after_epoch(self, trainer, *args, **kwargs) -> None:
        pass

    def before_step(self, trainer, *args, **kwargs) -> None:
        pass

    def after_step(self, trainer, *args, **kwargs) -> None:
        pass

    def before_evaluate(self, trainer, *args, **kwargs) -> None:
        pass

    def after_evaluate(self, trainer, *args, **kwargs) -> None:
        pass

    def after_save(self, trainer, *args, **kwargs) -> None:
        pass


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


class LoggerHook(Hook):
    """Logs every ``log_steps`` steps (default: ``trainer.args.log_steps``): the global step, the
    mean loss of the steps since the last log, every ``add_metric`` metric (its latest value),
    steps/s and samples/s over that window. samples/s counts every rank's rows (this rank's times
    the world size: ranks train equal batches in step).

    Rank 0 also appends one JSON line per log to ``<output_dir>/metrics.jsonl``::

        {"step": 10, "epoch": 0, "loss": 0.69, "metrics": {"auc": 0.51, "loss": 0.68},
         "steps_per_s": 3.2, "samples_per_s": 3277.0, "time": 1700000000.0}

    and an ``{"step": ..., "eval": {...}}`` line per evaluation; with ``tensorboard`` installed, it
    writes the same scalars as TensorBoard events under ``<output_dir>/tensorboard``. When stderr
    is a terminal (``progress=None``: auto), a one-line progress display (step / total, rate,
    time left) is redrawn there every step.
    """

    def __init__(self, log_steps: int | None = None, progress: bool | None = None,
                 tensorboard: bool | None = None) -> None:
        if log_steps is not None and (isinstance(log_steps, bool) or not isinstance(log_steps, int) or log_steps < 1):
            raise ValueError(f"LoggerHook: log_steps must be None or an int >= 1, got {log_steps!r}")
        self.log_steps = log_steps
        self.progress = progress
        self.tensorboard = tensorboard
        self._writer = None
        self._jsonl: str | None = None
        self.records: list[dict] = []  # what was logged (this process), for programmatic access

    # -- lifecycle ------------------------------------------------------------------------------

    def before_train(self, trainer, *args, **kwargs) -> None:
        self._every = self.log_steps or trainer.args.log_steps
        self._is_rank0 = _rank() == 0
        self._world = _world_size()
        self._progress = self.progress if self.progress is not None else sys.stderr.isatty()
        self._progress = self._progress and self._is_rank0
        self._reset_window(trainer.state.global_step)
        self._train_start = time.perf_counter()
        self._start_step = trainer.state.global_step
        if self._is_rank0:
            os.makedirs(trainer.args.output_dir, exist_ok=True)
            self._jsonl = os.path.join(trainer.args.output_dir, "metrics.jsonl")
            if self._writer is None and self.tensorboard is not False:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is optional
                    if self.tensorboard:
                        raise
                else:
                    self._writer = SummaryWriter(os.path.join(trainer.args.output_dir, "tensorboard"))

    def after_train(self, trainer, *args, **kwargs) -> None:
        if self._progress:
            sys.stderr.write("\n")
            sys.stderr.flush()
        if self._writer is not None:
            self._writer.flush()
        elapsed = time.perf_counter() - self._train_start
        steps = trainer.state.global_step - self._start_step
        logger.info_rank0(f"training done: step {trainer.state.global_step}, {steps} steps in {elapsed:.1f} s")

    def _reset_window(self, step: int) -> None:
        self._window_start = time.perf_counter()
        self._window_step = step
        self._loss_sum = None
        self._loss_n = 0
        self._samples = 0

    # -- steps ------------------------------------------------------------------------------------

    def after_step(self, trainer, step: int, outputs: dict, *args, **kwargs) -> None:
        loss = outputs["loss"].detach()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_n += 1
        self._samples += int(outputs.get("batch_size") or 0)
        if self._progress:
            self._draw_progress(trainer, step)
        if step % self._every == 0:
            self.log(trainer, step, outputs)

    def log(self, trainer, step: int, outputs: dict) -> dict:
        """Log the window that ends at ``step`` now (``after_step`` calls it every ``log_steps``)."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        steps = step - self._window_step
        record = {
            "step": step,
            "epoch": outputs.get("epoch", trainer.state.epoch),
            "loss": float(self._loss_sum) / max(self._loss_n, 1) if self._loss_sum is not None else None,
            "metrics": {name: to_float(v) for name, v in outputs.get("metrics", {}).items()},
            "steps_per_s": steps / elapsed,
            "samples_per_s": self._samples * self._world / elapsed,
            "time": time.time(),
        }
        self.records.append(record)
        metrics = "".join(f" | {name} {_fmt(v)}" for name, v in record["metrics"].items() if name != "loss")
        total = trainer.total_steps
        where = f"{step}/{total}" if total else str(step)
        if self._progress:
            sys.stderr.write("\r\033[K")
        logger.info_rank0(
            f"step {where} | loss {_fmt(record['loss'])}{metrics} | {record['steps_per_s']:.3g} steps/s | "
            f"{record['samples_per_s']:.4g} samples/s"
        )
        if self._is_rank0:
            self._append(record)
            if self._writer is not None:
                if record["loss"] is not None:
                    self._writer.add_scalar("train/loss", record["loss"], step)
                for name, v in record["metrics"].items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._writer.add_scalar(f"train/{name}", v, step)
                self._writer.add_scalar("train/steps_per_s", record["steps_per_s"], step)
                self._writer.add_scalar("train/samples_per_s", record["samples_per_s"], step)
        self._reset_window(step)
        return record

    def after_evaluate(self, trainer, results: dict, *args, **kwargs) -> None:
        step = trainer.state.global_step
        shown = " | ".join(f"{name} {_fmt(v)}" for name, v in results.items())
        logger.info_rank0(f"eval at step {step} | {shown}")
        record = {"step": step, "eval": dict(results), "time": time.time()}
        self.records.append(record)
        if _rank() == 0 and self._jsonl is not None:
            self._append(record)
            if self._writer is not None:
                for name, v in results.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._writer.add_scalar(f"eval/{name}", v, step)

    def _append(self, record: dict) -> None:
        if self._jsonl is None:
            return
        with open(self._jsonl, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def _draw_progress(self, trainer, step: int) -> None:
        total = trainer.total_steps
        elapsed = max(time.perf_counter() - self._train_start, 1e-9)
        rate = (step - self._start_step) / elapsed
        if total:
            done = min(1.0, step / total)
            bar = "=" * int(done * 30)
            left = (total - step) / rate if rate > 0 else float("inf")
            line = f"step {step}/{total} [{bar:<30}] {rate:.3g} steps/s, {left:.0f} s left"
        else:
            line = f"step {step} (epoch {trainer.state.epoch}) {rate:.3g} steps/s"
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()


class ProfilerHook(Hook):
    """``torch.profiler`` over a window of steps: skips ``wait`` steps after ``start_step`` (default:
    the first step of the run), warms up ``warmup`` steps, records ``active`` steps, ``repeat``
    times (RecIS's ``ProfilerHook`` arguments; torch's schedule). Each recorded window is written
    as a Chrome trace (``chrome://tracing``, Perfetto) to
    ``<output_dir or trainer.args.output_dir>/profile/trace_rank<r>_step<s>.json``
    (``self.traces`` lists them), and a table of the top ops by time is logged."""

    def __init__(self, wait: int = 1, warmup: int = 1, active: int = 3, repeat: int = 1,
                 output_dir: str | None = None, record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False) -> None:
        for name, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1), ("repeat", repeat, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ProfilerHook: {name} must be an int >= {low}, got {value!r}")
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.output_dir = output_dir
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.traces: list[str] = []
        self._profiler = None

    def before_train(self, trainer, *args, **kwargs) -> None:
        directory = os.path.join(self.output_dir or trainer.args.output_dir, "profile")
        os.makedirs(directory, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        def on_trace_ready(prof) -> None:
            path = os.path.join(directory, f"trace_rank{_rank()}_step{trainer.state.global_step}.json")
            prof.export_chrome_trace(path)
            self.traces.append(path)
            try:
                sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                table = prof.key_averages().table(sort_by=sort, row_limit=15)
            except (KeyError, AttributeError, RuntimeError):  # older torch: other sort keys
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            logger.info_rank0(f"profile written to {path}\n{table}")

        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat),
            on_trace_ready=on_trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._profiler.__enter__()

    def after_step(self, trainer, *args, **kwargs) -> None:
        if self._profiler is not None:
            self._profiler.step()

    def after_train(self, trainer, *args, **kwargs) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None


class HashTableFilterHook(Hook):
    """Every ``filter_interval`` steps, evicts stale ids from every table of the model
    (``HashTable.evict_stale``: what each table's ``FilterHook("GlobalStepFilter", ...)`` names;
    tables without a filter hook are left alone). RecIS's ``HashTableFilterHook``. Runs on every
    rank: with sharded tables each rank evicts from its shard, whose ``last_seen`` its owner
    lookups keep (``fxrec.distributed.sharded``).
    ``self.evicted`` counts the ids evicted so far, per table."""

    def __init__(self, filter_interval: int = 100) -> None:
        if isinstance(filter_interval, bool) or not isinstance(filter_interval, int) or filter_interval < 1:
            raise ValueError(f"HashTableFilterHook: filter_interval must be an int >= 1, got {filter_interval!r}")
        self.filter_interval = filter_interval
        self.evicted: dict[str, int] = {}

    def after_step(self, trainer, step: int, *args, **kwargs) -> None:
        if step % self.filter_interval:
            return
        from fxrec.nn.modules.hashtable import filter_out_sparse_param

        counts = {}
        for name, table in filter_out_sparse_param(trainer.model).items():
            n = table.evict_stale()
            if n:
                counts[name] = n
                self.evicted[name] = self.evicted.get(name, 0) + n
        if counts:
            logger.info_rank0(f"step {step}: evicted stale ids {counts}")
