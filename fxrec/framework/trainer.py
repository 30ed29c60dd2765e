"""``Trainer`` and ``TrainingArguments`` (SPEC §7; RecIS's ``recis.framework.trainer``).

One optimizer step (``gradient_accumulation_steps = k``)::

    k times: batch -> model(batch) -> loss -> (loss / k).backward()      # micro-batches
    dense_optimizer.step(); lr_scheduler.step(); sparse_optimizer.step(); zero every gradient

The model's ``forward(batch)`` returns the loss (a scalar tensor), as the tutorial's ``DeepCTR``.

Decisions (RecIS's bugs fixed as SPEC §7 decides; the rest written down here):

- Gradient accumulation really accumulates: the loss of each of the k micro-batches is scaled by
  1/k, so the dense gradients AND the sparse row gradients (the tables' pending gradients are
  summed over the k micro-batches by ``take_grads``) are those of one step on the k micro-batches
  concatenated — including ``grad_reduce_by="id"`` tables, whose mean over occurrences then runs
  over all k micro-batches. Because the loss is already scaled, the Trainer sets the sparse
  optimizer's ``set_grad_accum_steps(1)`` (its own division by k is for loops that do not scale
  the loss; doing both would divide twice). Under DDP the first k-1 micro-batches run under
  ``no_sync()``. When a pass over the data ends inside a group (m < k micro-batches), the step
  runs on the m it has: their gradients are rescaled by k/m (the mean over m) and, under DDP,
  all-reduced by hand.
- ``train_steps=N`` runs exactly N optimizer steps in all (counting the steps of the checkpoint
  it resumed from), re-iterating the dataset as often as needed, and stops even mid-epoch;
  ``train_epoch`` is then ignored. ``train_steps=None``: ``train_epoch`` passes over the data.
- Ranks stop together: before each micro-batch, every rank says whether it got one (an
  all-reduce MIN); when any rank ran out, the pass ends on every rank (the others' extra batch is
  dropped) and every fxrec dataset moves to the start of its next epoch.
- Checkpoints (``fxrec.framework.checkpoint.CheckpointManager``, SPEC §7.1): every ``save_steps``
  steps (``None``: no periodic saves) and once at the end of ``train()`` (unless that step is
  saved already). Rank 0 writes the dense parts; the others send it what only they hold (IO state,
  RNG state); every rank writes its table shard itself (``fxrec.distributed.checkpoint``).
  Parts: ``model`` (the dense ``state_dict``: everything but the tables, incl. metric counters),
  ``sparse.shard<r>`` (rank r's ``{table name: HashTable.state_dict()}``: the ids it owns,
  embedding, last_seen, step and the optimizer slots), ``sparse_optimizer.shard<r>`` (rank r's
  sparse optimizer state), ``dense_optimizer``, ``lr_scheduler`` (those given),
  ``trainer`` (global_step, epoch, world_size, every rank's torch RNG state) and ``io`` (every
  rank's ``dataset.dump_io_state()``, rank order; ``None`` for datasets without IO state).
- ``train()`` resumes from the latest checkpoint in ``output_dir`` when there is one: model,
  tables, optimizers, scheduler, step, epoch, RNG, and this rank's IO state, so the run goes on
  exactly (bit for bit) as an uninterrupted one. Tables are row-wise sharded: at any world size
  every rank loads the ids it owns now, reading only the saved shards that can hold them
  (``fxrec.distributed.checkpoint.load_shards``). The IO state is per rank and tied to the sharding of
  files over ``worker_num`` ranks: at a different world size it cannot be resumed row-exactly,
  so every rank restarts the epoch the checkpoint was in, from its first row, with a warning
  (rows read before the checkpoint in that epoch are read again). RNG states are restored only
  at the same world size.
- ``model_bank`` (a checkpoint directory ``.../ckpt_<n>``, or an output directory, whose latest
  checkpoint is taken; or a list of them, loaded in order): a warm start of the model's dense
  weights and the tables' ids and embeddings, used only when ``output_dir`` has no checkpoint
  to resume. Optimizer state, steps, eviction clocks and metric counters start fresh.
- Distributed (``torchrun``, ``WORLD_SIZE > 1``): the Trainer creates the process group if the
  script has not (gloo on CPU, NCCL on CUDA: ``fxrec.distributed.env``). Dense parameters are
  wrapped in ``DistributedDataParallel`` (``broadcast_buffers=False``, spelled
  ``forward_sync_buffers=False`` on torch >= 2.13; the tables' buffers are excluded from DDP
  altogether: they are not parameters and are never broadcast). Sparse tables
  are row-wise sharded: each id lives on one owner rank; lookups fetch rows from the owners and
  the sparse optimizer's step sends row gradients to them (``fxrec.distributed.sharded``).
- ``evaluate(eval_steps)``: ``model.eval()`` (tables do not insert) under ``torch.no_grad()``, over
  ``eval_steps`` batches (``None``: ``args.eval_steps``; ``None`` again: the whole eval dataset).
  Metric modules of the model (``fxrec.metrics.AUROC``/``Gauc``) are reset for the evaluation and
  restored after it, so evaluation metrics cover the evaluation data only and training metrics
  go on undisturbed. Returns ``{"loss": mean loss per row (all ranks), <metric>: the value the
  model last registered with add_metric (cumulative metrics such as AUROC: over all evaluated
  batches, all ranks with dist_sync_on_step), "steps": batches evaluated}``.
- ``train_and_evaluate(eval_interval=None)``: ``train()``, evaluating (``evaluate()``, i.e.
  ``args.eval_steps`` batches) every ``eval_interval`` steps, or after every epoch when
  ``eval_interval`` is None, and at the end.
- A ``ValueError`` or ``RuntimeError`` (exactly those types; subclasses pass through unchanged)
  raised while running a training step — e.g. AUROC rejecting NaN or out-of-range predictions or
  labels (``ValueError``), ``binary_cross_entropy``'s range checks (``RuntimeError``) — is raised
  again, same type, as ``"Trainer: step <n> (epoch <e>): <the original message>"`` (n: the global
  step being run, 1-based), chained to the original (``from err``).
- ``compile=True``: the forward (features, lookups, dense model, loss, metric updates) runs
  compiled, ``fxrec.compile`` of the model (of its DDP wrapper under DDP), its engines' graphs
  rewritten with the default passes first (before the DDP wrapping): in one process one
  Inductor graph for every batch size and ragged length, whose backward AOTAutograd compiles with
  it; with several ranks the tables are sharded and each lookup's all-to-all is traced into that
  graph as a functional collective (the graph breaks only in DDP's own wrapper, ``fxrec.compile``).
  The optimizer steps, the gradient
  rescaling and evaluation run as without it. Results equal the eager ones up to float rounding,
  in one process and on several ranks (each rank's table shard included). ``save_concurrency_per_rank`` is accepted and has no effect
  yet (rank 0 writes each part file in turn).
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxrec.compiler import compile as fxrec_compile
from fxrec.compiler import rewrite_engines
from fxrec.distributed.ddp import wrap_ddp
from fxrec.distributed.env import all_true, collective_device, default_device, init_distributed, is_distributed
from fxrec.distributed.env import rank as _rank
from fxrec.distributed.env import world_size as _world_size
from fxrec.distributed.checkpoint import (is_shard_part, load_shards, merge_shards, save_sharded, shard_part,
                                          shards_to_read)
from fxrec.framework.checkpoint import CheckpointManager
from fxrec.framework.hooks import Hook, LoggerHook
from fxrec.framework.metrics import clear_metrics, get_log_metrics
from fxrec.nn.modules.hashtable import HashTable, filter_out_sparse_param
from fxrec.ragged import RaggedTensor
from fxrec.utils.logger import Logger

__all__ = ["Trainer", "TrainerState", "TrainingArguments"]

logger = Logger(__name__)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class TrainingArguments:
    """RecIS's ``TrainingArguments`` (SPEC §7); see the module docstring for what each does.

    Args:
        gradient_accumulation_steps: micro-batches per optimizer step (int >= 1).
        output_dir: where checkpoints, ``metrics.jsonl`` and traces go (and resume comes from).
        model_bank: a checkpoint to warm-start from (path or list of paths), or None.
        log_steps: log every this many steps (int >= 1).
        train_steps: optimizer steps in all (int >= 0), or None to run ``train_epoch`` epochs.
        train_epoch: passes over the training data when ``train_steps`` is None (int >= 1).
        eval_steps: batches per evaluation (int >= 1), or None for the whole eval dataset.
        save_steps: checkpoint every this many steps (int >= 1), or None for no periodic saves.
        max_to_keep: checkpoints kept (int >= 0; 0 or None keeps all).
        save_concurrency_per_rank: accepted, no effect yet (int >= 1).
        compile: run the model's forward (and so its backward) compiled (``fxrec.compile``, the
            engines' graphs rewritten by the default passes).
    """

    gradient_accumulation_steps: int = 1
    output_dir: str = "output_dir"
    model_bank: str | list[str] | None = None
    log_steps: int = 100
    train_steps: int | None = None
    train_epoch: int | None = 1
    eval_steps: int | None = None
    save_steps: int | None = 1000
    max_to_keep: int | None = 5
    save_concurrency_per_rank: int = 4
    compile: bool = False

    def __post_init__(self) -> None:
        def check(name: str, low: int, optional: bool) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if not _is_int(value) or value < low:
                none = " or None" if optional else ""
                raise ValueError(f"TrainingArguments: {name} must be an int >= {low}{none}, got {value!r}")

        check("gradient_accumulation_steps", 1, False)
        check("log_steps", 1, False)
        check("train_steps", 0, True)
        check("train_epoch", 1, True)
        check("eval_steps", 1, True)
        check("save_steps", 1, True)
        check("max_to_keep", 0, True)
        check("save_concurrency_per_rank", 1, False)
        if self.train_steps is None and self.train_epoch is None:
            raise ValueError("TrainingArguments: give train_steps or train_epoch (both are None)")
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"TrainingArguments: output_dir must be a non-empty path, got {self.output_dir!r}")
        bank = self.model_bank
        if bank is not None:
            paths = bank if isinstance(bank, (list, tuple)) else [bank]
            if not paths or not all(isinstance(p, (str, os.PathLike)) and os.fspath(p) for p in paths):
                raise ValueError(f"TrainingArguments: model_bank must be a path, a list of paths or None, got {bank!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"TrainingArguments: compile must be a bool, got {self.compile!r}")


@dataclass
class TrainerState:
    """``global_step``: optimizer steps done (over every run resumed from); ``epoch``: completed
    passes over the training data."""

    global_step: int = 0
    epoch: int = 0


# -- batches ---------------------------------------------------------------------------------------

def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, (Tensor, RaggedTensor)):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def batch_size_of(batch: Any) -> int:
    """Rows of a batch: the first dimension of its first tensor (or RaggedTensor) value; 0 if none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, RaggedTensor):
        return batch.batch_size
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for value in values:
        n = batch_size_of(value)
        if n:
            return n
    return 0


# -- datasets with an IO state (fxrec.io) ----------------------------------------------------------

def _fxrec_dataset(dataset) -> bool:
    from fxrec.io.dataset import DatasetBase

    return isinstance(dataset, DatasetBase)


def _epoch_start_state(dataset, epoch: int) -> dict:
    """The IO state of ``dataset`` (an fxrec dataset) at the first row of ``epoch``."""
    from fxrec.io.state import IOState

    return IOState.start(epoch).to_dict(dataset._worker_idx, dataset._worker_num, dataset._shard(epoch))


def _metric_modules(model: nn.Module) -> list[nn.Module]:
    from fxrec.metrics import AUROC, Gauc

    return [m for m in model.modules() if isinstance(m, (AUROC, Gauc))]


def _table_prefixes(model: nn.Module) -> list[str]:
    """Module names of the model's HashTables (their state_dict keys start with ``name + '.'``)."""
    return [name for name, m in model.named_modules() if isinstance(m, HashTable)]


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p + ".") if p else True for p in prefixes)


def _dense_state_dict(model: nn.Module) -> OrderedDict:
    """``model.state_dict()`` without the tables' entries (they go to the "sparse" part)."""
    prefixes = _table_prefixes(model)
    full = model.state_dict()
    dense = OrderedDict((k, v) for k, v in full.items() if not _under(k, prefixes))
    metadata = getattr(full, "_metadata", None)
    if metadata is not None:
        dense._metadata = OrderedDict((k, v) for k, v in metadata.items() if not (k and _under(k + ".x", prefixes)))
    return dense


def _resolve_model_bank(path: str | os.PathLike) -> tuple[CheckpointManager, int | None]:
    """(manager, step) of a model_bank entry: a ``ckpt_<n>`` directory or an output directory."""
    path = pathlib.Path(path)
    if (path / "index.json").is_file():
        name = path.name.split(".")[1] if path.name.startswith(".") else path.name
        if name.startswith("ckpt_") and name[5:].isdigit():
            return CheckpointManager(path.parent, max_to_keep=None), int(name[5:])
        raise ValueError(f"model_bank {str(path)!r}: a checkpoint directory must be named ckpt_<step>")
    if path.is_dir():
        return CheckpointManager(path, max_to_keep=None), None
    raise FileNotFoundError(f"model_bank {str(path)!r}: no such checkpoint or directory")


class Trainer:
    """The training loop (module docstring). RecIS's signature::

        Trainer(model, args, train_dataset, eval_dataset=None, hooks=None,
                dense_optimizers=(optimizer, lr_scheduler), sparse_optimizer=None, data_to_cuda=False)

    Args:
        model: an ``nn.Module`` whose ``forward(batch)`` returns the loss (a scalar tensor).
        args: ``TrainingArguments`` (default: all defaults).
        train_dataset: an iterable of batches (an fxrec ``OrcDataset``/``ParquetDataset`` for exact
            resume); each ``iter()`` is one pass.
        eval_dataset: batches for ``evaluate()``.
        hooks: ``Hook``s, called in order (``fxrec.framework.hooks``). A ``LoggerHook`` is added
            first unless one is given.
        dense_optimizers: ``(optimizer, lr_scheduler)``; either may be None.
        sparse_optimizer: an fxrec sparse optimizer over the model's tables, or None (then the
            tables are not trained).
        data_to_cuda: copy each batch to the model's CUDA device (the dataset may deliver on the
            GPU itself, ``device="cuda"``).
        find_unused_parameters: passed to DDP (keyword only; default False).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_dataset: Iterable | None = None,
        eval_dataset: Iterable | None = None,
        hooks: list[Hook] | None = None,
        dense_optimizers: tuple = (None, None),
        sparse_optimizer=None,
        data_to_cuda: bool = False,
        *,
        find_unused_parameters: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: model must be an nn.Module, got {type(model).__name__}")
        args = TrainingArguments() if args is None else args
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"Trainer: args must be TrainingArguments, got {type(args).__name__}")
        if dense_optimizers is None:
            dense_optimizers = (None, None)
        if not isinstance(dense_optimizers, (tuple, list)) or len(dense_optimizers) != 2:
            raise TypeError(f"Trainer: dense_optimizers must be a pair (optimizer, lr_scheduler), got {dense_optimizers!r}")
        dense_optimizer, lr_scheduler = dense_optimizers
        if dense_optimizer is not None and not isinstance(dense_optimizer, torch.optim.Optimizer):
            raise TypeError(f"Trainer: the dense optimizer must be a torch.optim.Optimizer, got {dense_optimizer!r}")
        if lr_scheduler is not None and not hasattr(lr_scheduler, "step"):
            raise TypeError(f"Trainer: the lr scheduler must have step(), got {lr_scheduler!r}")
        from fxrec.optim.sparse_optimizer import SparseOptimizer

        if sparse_optimizer is not None and not isinstance(sparse_optimizer, SparseOptimizer):
            raise TypeError(f"Trainer: sparse_optimizer must be an fxrec sparse optimizer, got {sparse_optimizer!r}")
        hooks = list(hooks or [])
        for hook in hooks:
            if not isinstance(hook, Hook):
                raise TypeError(f"Trainer: hooks must be fxrec Hook instances, got {hook!r}")
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.dense_optimizer = dense_optimizer
        self.lr_scheduler = lr_scheduler
        self.sparse_optimizer = sparse_optimizer
        self.data_to_cuda = bool(data_to_cuda)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.hooks: list[Hook] = ([] if any(isinstance(h, LoggerHook) for h in hooks) else [LoggerHook()]) + hooks
        self.state = TrainerState()
        self.tables = filter_out_sparse_param(model)
        if sparse_optimizer is not None:
            foreign = [name for name, t in sparse_optimizer.tables.items() if self.tables.get(name) is not t]
            if foreign:
                raise ValueError(f"Trainer: the sparse optimizer's tables {foreign} are not the model's tables")
            sparse_optimizer.set_grad_accum_steps(1)  # the loss is scaled by 1/k (module docstring)
        elif self.tables:
            logger.warning_rank0(f"Trainer: no sparse_optimizer: the tables {sorted(self.tables)} are not trained")
        init_distributed()
        self.rank, self.world_size = _rank(), _world_size()
        self.device = self._model_device()
        if self.data_to_cuda:
            if not torch.cuda.is_available():
                raise ValueError("Trainer: data_to_cuda=True needs CUDA, and it is not available")
            if self.device.type != "cuda":
                self.device = default_device()
        self.checkpoint_manager = CheckpointManager(args.output_dir, max_to_keep=args.max_to_keep)
        self._ddp: nn.Module | None = None
        self._compiled = None  # fxrec.compile of the model (or of its DDP wrapper) with args.compile
        self._prepared = False
        self._restored = False
        self._last_saved_step: int | None = None
        self._exhausted_here = False
        self._eval_interval: int | None = None
        self._eval_each_epoch = False
        self.last_eval: dict | None = None

    # -- small helpers ------------------------------------------------------------------------------

    def _model_device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def total_steps(self) -> int | None:
        """``args.train_steps`` (None when training by epochs)."""
        return self.args.train_steps

    def add_hook(self, hook: Hook) -> None:
        if not isinstance(hook, Hook):
            raise TypeError(f"Trainer: hooks must be fxrec Hook instances, got {hook!r}")
        self.hooks.append(hook)

    def add_hooks(self, hooks: Iterable[Hook]) -> None:
        for hook in hooks:
            self.add_hook(hook)

    def _call_hooks(self, event: str, *args, **kwargs) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args, **kwargs)

    def _prepare_batch(self, batch: Any) -> Any:
        return _to_device(batch, self.device) if self.data_to_cuda else batch

    def _next_batch(self, iterator: Iterator) -> Any | None:
        """The next batch, or None when this rank OR any other rank has run out (a collective)."""
        try:
            batch, has = next(iterator), True
        except StopIteration:
            batch, has = None, False
        self._exhausted_here = not has
        if not all_true(has, self.device):
            return None
        return batch

    def _done(self) -> bool:
        if self.args.train_steps is not None:
            return self.state.global_step >= self.args.train_steps
        return self.state.epoch >= self.args.train_epoch

    # -- setup: process group, resume / warm start, DDP ------------------------------------------

    def _restore(self) -> None:
        """Once per Trainer: resume from ``output_dir``'s latest checkpoint, else warm-start from
        ``model_bank`` (module docstring)."""
        if self._restored:
            return
        latest = self.checkpoint_manager.latest_step()
        if latest is not None:
            self.load_checkpoint(latest)
        elif self.args.model_bank is not None:
            bank = self.args.model_bank
            for path in bank if isinstance(bank, (list, tuple)) else [bank]:
                self.warm_start(path)
        self._restored = True

    def _prepare(self) -> None:
        if self._prepared:
            return
        if self.train_dataset is None:
            raise ValueError("Trainer.train: no train_dataset")
        self._restore()
        if self.args.compile:  # the graphs fxrec.compile compiles, rewritten before DDP sees the model
            rewrite_engines(self.model)
        self._wrap_ddp()
        if self.args.compile:
            self._compiled = fxrec_compile(self._ddp if self._ddp is not None else self.model)
        self._prepared = True

    def _wrap_ddp(self) -> None:
        self._ddp = wrap_ddp(self.model, self.device, self.find_unused_parameters)

    # -- training -----------------------------------------------------------------------------------

    def train(self) -> TrainerState:
        """Train (module docstring); returns ``self.state``."""
        self._prepare()
        self._call_hooks("before_train")
        empty_passes = 0
        while not self._done():
            steps = self._train_pass()
            empty_passes = empty_passes + 1 if steps == 0 else 0
            if empty_passes >= 2:
                raise RuntimeError(f"Trainer: the training dataset yielded no batch (epoch {self.state.epoch})")
        if self.state.global_step > 0 and self._last_saved_step != self.state.global_step:
            self.save_checkpoint()
        if self._eval_interval is not None or self._eval_each_epoch:
            if self.last_eval is None or self.last_eval.get("global_step") != self.state.global_step:
                self._evaluate_in_training()
        self._call_hooks("after_train")
        if is_distributed():
            # Every rank leaves together: none tears its process group down (or exits) while
            # another still runs a collective or rank 0 still writes the final checkpoint.
            dist.barrier()
        return self.state

    def _train_pass(self) -> int:
        """One pass over the training data (or its rest, when resumed or stopped by train_steps);
        returns the steps run."""
        dataset = self.train_dataset
        epoch = self.state.epoch
        if _fxrec_dataset(dataset):
            dataset.load_io_state(dataset.dump_io_state())  # go on from the last delivered row
        iterator = iter(dataset)
        self._call_hooks("before_epoch", epoch)
        steps = 0
        ended = False
        try:
            while not self._done():
                batch = self._next_batch(iterator)
                if batch is None:
                    ended = True
                    break
                step = self.state.global_step + 1
                self._call_hooks("before_step", step)
                try:
                    outputs, ended = self._train_step(batch, iterator)
                except (ValueError, RuntimeError) as err:
                    if type(err) not in (ValueError, RuntimeError):  # subclasses (DistError, ...) as they are
                        raise
                    raise type(err)(f"Trainer: step {step} (epoch {epoch}): {err}") from err
                self.state.global_step = step
                steps += 1
                self._call_hooks("after_step", step, outputs)
                if self.args.save_steps is not None and step % self.args.save_steps == 0:
                    self.save_checkpoint()
                if self._eval_interval is not None and step % self._eval_interval == 0:
                    self._evaluate_in_training()
                if ended:
                    break
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        if ended:
            if _fxrec_dataset(dataset) and not self._exhausted_here:  # stopped by another rank
                dataset.load_io_state(_epoch_start_state(dataset, dataset.dump_io_state()["epoch"] + 1))
            self.state.epoch = epoch + 1
            self._call_hooks("after_epoch", epoch)
            if self._eval_each_epoch:
                self._evaluate_in_training()
        return steps

    def _train_step(self, batch: Any, iterator: Iterator) -> tuple[dict, bool]:
        """One optimizer step from ``batch`` and up to k-1 more; returns (outputs, data ended)."""
        k = self.args.gradient_accumulation_steps
        model = self._ddp if self._ddp is not None else self.model
        model.train()
        forward = self._compiled if self._compiled is not None else model
        losses, rows, metrics, m, ended = [], 0, {}, 0, False
        while True:
            m += 1
            batch = self._prepare_batch(batch)
            rows += batch_size_of(batch)
            sync = self._ddp is None or m == k
            clear_metrics()
            with contextlib.nullcontext() if sync else self._ddp.no_sync():
                loss = forward(batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(f"Trainer: the model's forward must return the loss as a scalar tensor, got "
                                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
                (loss.reshape(()) / k).backward()
            losses.append(loss.detach().reshape(()))
            metrics = get_log_metrics()
            if m == k:
                break
            batch = self._next_batch(iterator)
            if batch is None:
                ended = True
                break
        if m < k:
            self._rescale_partial_group(m, k)
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.step()
        if self.dense_optimizer is not None:
            self.dense_optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        for table in self.tables.values():
            table.clear_grads()
        loss = torch.stack(losses).mean()
        return {"loss": loss, "metrics": metrics, "batch_size": rows, "epoch": self.state.epoch}, ended

    @torch.no_grad()
    def _rescale_partial_group(self, m: int, k: int) -> None:
        """A group of m < k micro-batches (the data ended): gradients scaled 1/k -> 1/m; under DDP
        (every micro-batch ran under no_sync) dense gradients are averaged over ranks here."""
        factor = k / m
        for p in self.model.parameters():
            if p.grad is None:
                continue
            if self._ddp is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size
            p.grad *= factor
        for table in self.tables.values():
            table.scale_grads(factor)

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self, eval_steps: int | None = None) -> dict:
        """Evaluate on ``eval_dataset`` (module docstring); returns the results dict. Called
        before any ``train()``, it first restores the model as ``train()`` would (the latest
        checkpoint of ``output_dir``, else ``model_bank``): an evaluation-only run."""
        if self.eval_dataset is None:
            raise ValueError("Trainer.evaluate: no eval_dataset")
        self._restore()
        steps = self.args.eval_steps if eval_steps is None else eval_steps
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(f"Trainer.evaluate: eval_steps must be an int >= 1 or None, got {steps!r}")
        self._call_hooks("before_evaluate")
        was_training = self.model.training
        metric_modules = _metric_modules(self.model)
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in metric_modules]
        for m in metric_modules:
            m.reset()
        total = torch.zeros(2, dtype=torch.float64)  # (sum of loss * rows, rows)
        n, metrics = 0, {}
        iterator = iter(self.eval_dataset)
        self.model.eval()
        try:
            with torch.no_grad():
                while steps is None or n < steps:
                    batch = self._next_batch(iterator)
                    if batch is None:
                        break
                    batch = self._prepare_batch(batch)
                    clear_metrics()
                    loss = self.model(batch)
                    rows = batch_size_of(batch)
                    total += torch.tensor([float(loss) * rows, rows], dtype=torch.float64)
                    metrics = get_log_metrics()
                    n += 1
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            self.model.train(was_training)
            for m, state in zip(metric_modules, saved):
                m.load_state_dict(state)
        if is_distributed():
            t = total.to(collective_device(self.device))
            dist.all_reduce(t)
            total = t.cpu()
        from fxrec.framework.hooks import to_float

        results = {"loss": float(total[0] / total[1]) if total[1] > 0 else math.nan}
        results.update({name: to_float(v) for name, v in metrics.items() if name != "loss"})
        results["steps"] = n
        if n == 0:
            logger.warning_rank0("Trainer.evaluate: the eval dataset yielded no batch")
        self._call_hooks("after_evaluate", results)
        return results

    def _evaluate_in_training(self) -> None:
        results = self.evaluate()
        self.last_eval = dict(results, global_step=self.state.global_step)

    def train_and_evaluate(self, eval_interval: int | None = None) -> dict | None:
        """``train()``, evaluating every ``eval_interval`` steps (None: after every epoch) and at
        the end (module docstring); returns the last evaluation's results."""
        if eval_interval is not None and (not _is_int(eval_interval) or eval_interval < 1):
            raise ValueError(f"Trainer.train_and_evaluate: eval_interval must be an int >= 1 or None, got {eval_interval!r}")
        if self.eval_dataset is None:
            raise ValueError("Trainer.train_and_evaluate: no eval_dataset")
        self._eval_interval = eval_interval
        self._eval_each_epoch = eval_interval is None
        try:
            self.train()
        finally:
            self._eval_interval, self._eval_each_epoch = None, False
        return self.last_eval

    # -- checkpoints ---------------------------------------------------------------------------------

    def _gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (small, picklable) in rank order."""
        if not is_distributed():
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def checkpoint_parts(self) -> dict[str, Any]:
        """The dense state a checkpoint holds (module docstring), as rank 0 saves it. A collective."""
        io_state = self.train_dataset.dump_io_state() if hasattr(self.train_dataset, "dump_io_state") else None
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        io_states = self._gather(io_state)
        rng_states = self._gather(rng)
        parts: dict[str, Any] = {"model": _dense_state_dict(self.model)}
        if self.dense_optimizer is not None:
            parts["dense_optimizer"] = self.dense_optimizer.state_dict()
        if self.lr_scheduler is not None:
            parts["lr_scheduler"] = self.lr_scheduler.state_dict()
        parts["trainer"] = {
            "global_step": self.state.global_step,
            "epoch": self.state.epoch,
            "world_size": self.world_size,
            "rng": rng_states,
            "args": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(self.args).items()},
        }
        parts["io"] = io_states
        return parts

    def shard_parts(self) -> dict[str, Any]:
        """This rank's table shard as checkpoint parts (``fxrec.distributed.checkpoint``)."""
        shard = {shard_part("sparse", self.rank): {name: table.state_dict() for name, table in self.tables.items()}}
        if self.sparse_optimizer is not None:
            shard[shard_part("sparse_optimizer", self.rank)] = self.sparse_optimizer.state_dict()
        return shard

    def save_checkpoint(self) -> pathlib.Path | None:
        """Write checkpoint ``ckpt_<global_step>`` (rank 0 writes the dense parts, every rank its
        table shard; every rank must call it)."""
        parts = self.checkpoint_parts()
        path = save_sharded(self.checkpoint_manager, self.state.global_step, parts, self.shard_parts())
        self._last_saved_step = self.state.global_step
        if path is not None:
            logger.info(f"saved checkpoint {path}")
        self._call_hooks("after_save", self.state.global_step, path)
        return path

    def _load_dense(self, state: dict, skip: list[str], strict: bool, what: str) -> None:
        state = OrderedDict((k, v) for k, v in state.items() if not _under(k, skip))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        prefixes = _table_prefixes(self.model) + skip
        missing = [k for k in missing if not _under(k, prefixes)]
        if missing or unexpected:
            message = f"{what}: the model's dense state does not match: missing {missing}, unexpected {unexpected}"
            if strict:
                raise ValueError(message)
            logger.warning_rank0(message)

    def load_checkpoint(self, step: int | None = None) -> None:
        """Restore everything from checkpoint ``step`` (None: the latest) of ``output_dir``
        (module docstring: resume)."""
        manager = self.checkpoint_manager
        step = manager.latest_step() if step is None else step
        names = manager.part_names(step)
        dense = [p for p in names if not is_shard_part(p)]
        parts = manager.load(step, parts=dense + shards_to_read(names, self.rank, self.world_size),
                             map_location=self.device)
        parts.update(merge_shards(parts, self.rank, self.world_size))
        what = f"resuming from {manager.output_dir}/ckpt_{parts['trainer']['global_step']}"
        self._load_dense(parts["model"], [], True, what)
        sparse = parts["sparse"] or {}
        unknown = sorted(set(sparse) - set(self.tables))
        missing = sorted(set(self.tables) - set(sparse))
        if unknown or missing:
            raise ValueError(f"{what}: the checkpoint's tables {sorted(sparse)} are not the model's {sorted(self.tables)}")
        for name, table in self.tables.items():
            table.load_state_dict(sparse[name])
        for part, target in (("dense_optimizer", self.dense_optimizer), ("lr_scheduler", self.lr_scheduler),
                             ("sparse_optimizer", self.sparse_optimizer)):
            if target is None:
                continue
            if parts.get(part) is None:
                raise ValueError(f"{what}: the checkpoint has no {part} state")
            target.load_state_dict(parts[part])
        trainer = parts["trainer"]
        self.state = TrainerState(global_step=int(trainer["global_step"]), epoch=int(trainer["epoch"]))
        self._last_saved_step = self.state.global_step
        saved_world = int(trainer.get("world_size", 1))
        if saved_world == self.world_size:
            rng = trainer["rng"][self.rank]
            torch.set_rng_state(rng["cpu"].cpu())
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"].cpu())
        self._restore_io(parts.get("io") or [], saved_world, what)
        logger.info_rank0(f"{what}: step {self.state.global_step}, epoch {self.state.epoch}")

    def _restore_io(self, io_states: list, saved_world: int, what: str) -> None:
        dataset = self.train_dataset
        if dataset is None:
            return
        if not hasattr(dataset, "load_io_state"):
            if any(s is not None for s in io_states):
                logger.warning_rank0(f"{what}: the training dataset has no IO state to restore; it starts from its "
                                     "beginning")
            return
        if saved_world == self.world_size and len(io_states) == self.world_size:
            if io_states[self.rank] is not None:
                dataset.load_io_state(io_states[self.rank])
            return
        epochs = [s["epoch"] for s in io_states if isinstance(s, dict) and "epoch" in s]
        epoch = min(epochs) if epochs else 0
        logger.warning_rank0(
            f"{what}: the checkpoint was written by {saved_world} ranks, this run has {self.world_size}: the IO "
            f"state cannot be resharded row-exactly, so every rank restarts epoch {epoch} from its first row "
            "(rows read before the checkpoint in that epoch are read again)"
        )
        if _fxrec_dataset(dataset):
            dataset.load_io_state(_epoch_start_state(dataset, epoch))

    def warm_start(self, path: str | os.PathLike) -> None:
        """Load dense weights and table rows from a checkpoint (``model_bank``; module docstring)."""
        manager, step = _resolve_model_bank(path)
        parts = manager.load(step, parts=["model"], map_location=self.device)
        what = f"warm start from {os.fspath(path)}"
        skip = [name for name, m in self.model.named_modules() if m in _metric_modules(self.model)]
        self._load_dense(parts["model"], skip, False, what)
        sparse = load_shards(manager, step, self.rank, self.world_size, ("sparse",), self.device)["sparse"] or {}
        for name in sorted(set(sparse) - set(self.tables)):
            logger.warning_rank0(f"{what}: the checkpoint's table {name!r} is not in the model; skipped")
        for name, table in self.tables.items():
            if name not in sparse:
                logger.warning_rank0(f"{what}: table {name!r} is not in the checkpoint; it starts empty")
                continue
            ids = sparse[name]["ids"]
            table.load_state_dict({
                "ids": ids,
                "embedding": sparse[name]["embedding"],
                "last_seen": torch.zeros_like(ids),
                "step": torch.zeros((), dtype=torch.int64),
            })
        logger.info_rank0(f"{what}: {len(parts['model'])} dense tensors, tables {sorted(set(sparse) & set(self.tables))}")
