"""``SparseOptimizer``: the base of fxrec's sparse optimizers (SPEC §5.1, §4.5).

A sparse optimizer updates the rows of ``HashTable``s that a step touched, lazily (rows without a
gradient keep their bits, and so do their slots), with one fused op per physical table
(``torch.ops.fxrec.sparse_*_update``). Subclasses name their slots and their update.

Decisions:

- ``torch.optim.Optimizer`` subclass with ONE param group, so torch's LR schedulers drive
  ``param_groups[0]["lr"]``; every step reads the group's current hyperparameters.
- What the group's ``"params"`` hold: one empty placeholder tensor per table, named by the table
  (``param_names``). ``Optimizer`` insists on a non-empty list of leaf tensors, but a table's
  tensors are no good there: growth, eviction and ``load_state_dict`` REPLACE ``embedding``, its
  slots and even its ``step`` buffer, so a tensor held in the group would go stale. The
  placeholders never change, hold no memory, never get a ``.grad`` (so ``clip_grad_norm_``,
  ``GradScaler`` and friends skip them); the tables themselves live in ``self.tables``
  (``{name: HashTable}``), and torch's per-param ``self.state`` stays unused.
- Gradients: ``table.take_grads()`` gives each touched row once, already reduced per the table's
  ``grad_reduce_by`` (SPEC §4.5), padded with rows -1 that the update ops skip: no host sync. With ``set_grad_accum_steps(k)``, a ``"worker"`` table's
  gradients (sums over the k micro-batches' occurrences) are divided by k, averaging them as
  dense gradients are; an ``"id"`` table's are not: its mean over occurrences already runs over
  every occurrence of the k micro-batches, so it is an average as it stands. (This is for loops
  that backpropagate the unscaled loss. ``fxrec.framework.Trainer`` scales the loss by 1/k, which
  averages dense and sparse gradients alike, "id" tables included, and sets this to 1.)
- One update per storage: tables coalesced into one storage (``table_coalesce``) share its rows,
  slots, hyperparameters and ``grad_reduce_by``, and their lookups share gradient anchors, so
  when all of them are this optimizer's and their scalars are equal, ONE update serves them all
  (``take_storage_grads``: each shared anchor read once), not one per table reading the whole
  anchor with the other tables' rows -1: per step one op call and one pass over the anchor per
  storage. Every step advances every table's scalars alike, so tables whose scalars were equal
  stay equal; ``load_state_dict`` may make them differ (it compares what it loaded, on the host),
  and then those tables are updated one by one, each with its own scalars.
- Several processes (a process group of more than one rank): tables are row-wise SHARDED, and
  ``step`` first sends every rank's row gradients to the ids' owners
  (``fxrec.distributed.sharded.reduce_grads_to_owners``: reduced over all ranks per
  ``grad_reduce_by``); each rank then updates the rows it owns. Every rank must call ``step``
  together (it is a collective). ``state_dict`` holds this rank's shard (its ids).
- Per-table state (``table_state[name]``: ``step``, and Adam's running products ``b1p``/``b2p``):
  TENSORS on the table's device (0-d int64 ``step``; float64 ``b1p``/``b2p`` of shape ``[1]``),
  updated in place (``step.add_(1)``, ``b1p.mul_(beta1)``): a compiled step neither guards on
  them (Python numbers would be specialized, so every Adam step would recompile) nor syncs to
  read them; ``_table_state`` moves them along if the tables moved device. Why ``[1]`` and not
  0-d for the floats: torch 2.13's Dynamo gives a 0-d CPU float64 graph input an ``.item()``
  symbol (FakeTensorConverter's ``item_memo``), and the ``tensorify_python_scalars`` restart
  then DROPS the in-place update of it (``b.mul_(0.9)`` compiles to nothing, silently; 0-d
  int64 and ``[1]`` float64 are kept). ``state_dict`` gives every scalar 0-d all the same. The state advances on EVERY
  optimizer step, whether or not the table got gradient rows (RecIS's rule, SPEC §5.1 "per
  table, per update step"; a table's rows without a gradient stay untouched). The same holds
  for the tables' own step (``HashTable.advance_steps``: the eviction clock of ``GlobalStepFilter``;
  one foreach op advances both). Branching on
  whether a step touched a table would also need a host sync, which a compiled step cannot take.
- Slots are created (``table.slot``) when the optimizer is built, so ids inserted before the
  first step, and rows rebuilt by a model ``load_state_dict``, get the slot's initial value.
- ``state_dict()`` is keyed by table name (RecIS's keys collided across tables): per table its
  scalars (0-d tensors: int64 ``step``, float64 ``b1p``/``b2p``), ``ids`` (the table's ids, in
  row order) and ``slot.<name> [n, width]`` for those ids; plus ``param_groups`` (torch's format,
  ``params`` numbered, ``param_names`` the tables). Every leaf of ``state`` is a tensor (ready
  for safetensors). ``load_state_dict`` restores it bit-exactly (the scalars copied in place
  into the optimizer's per-table tensors) into an optimizer over the same table names whose
  tables hold those ids (e.g. after ``model.load_state_dict``); an unknown or missing table, an
  id the table lacks, or a missing / misshapen slot or scalar is a ``ValueError`` naming the
  table, raised before anything is written. Ids the table holds beyond the saved ones keep
  their slot values. The HashTable's own ``state_dict`` also stores the slots (SPEC §4.4); the
  optimizer's round-trips alone all the same.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fxrec.distributed.env import is_distributed
from fxrec.distributed.sharded import reduce_grads_to_owners
from fxrec.nn.modules.hashtable import HashTable, take_storage_grads

__all__ = ["SparseOptimizer", "check_hyperparameter"]


def check_hyperparameter(owner: str, name: str, value: Any, low: float = 0.0, high: float = math.inf,
                         high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]`` (``[low, high)`` with
    ``high_open``), else a ``ValueError`` naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        interval = f"[{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _collect_tables(tables: Any, owner: str) -> dict[str, HashTable]:
    """``{name: table}`` from ``filter_out_sparse_param``'s dict, an iterable of tables (keyed by
    ``table.name``) or one table; every table float32, each table and name once."""
    if isinstance(tables, HashTable):
        tables = [tables]
    if isinstance(tables, Mapping):
        items = list(tables.items())
    elif isinstance(tables, Iterable) and not isinstance(tables, (str, bytes, Tensor)):
        items = [(getattr(t, "name", None), t) for t in tables]
    else:
        raise TypeError(
            f"{owner}: expected {{name: HashTable}} or an iterable of HashTable, got {type(tables).__name__}"
        )
    out: dict[str, HashTable] = {}
    for name, table in items:
        if not isinstance(table, HashTable):
            raise TypeError(f"{owner}: table {name!r} is a {type(table).__name__}, not a HashTable")
        if not isinstance(name, str):
            raise TypeError(f"{owner}: table names must be str, got {name!r}")
        if table.dtype != torch.float32:
            raise TypeError(f"{owner}: table {name!r} has dtype {table.dtype}; sparse optimizers update float32 tables")
        if name in out:
            raise ValueError(f"{owner}: two tables are named {name!r}")
        if any(table is t for t in out.values()):
            raise ValueError(f"{owner}: table {name!r} is given twice")
        out[name] = table
    if not out:
        raise ValueError(f"{owner}: no tables to optimize")
    return out


class SparseOptimizer(Optimizer, metaclass=ABCMeta):
    """Base class (module docstring). Subclasses define ``_slot_specs``, ``_update`` and, with
    per-table scalars beyond ``step``, ``_new_table_state`` and ``_advance``."""

    def __init__(self, tables: Mapping[str, HashTable] | Iterable[HashTable], defaults: dict[str, Any]) -> None:
        self.tables = _collect_tables(tables, type(self).__name__)
        placeholders = [(name, torch.empty(0)) for name in self.tables]  # see the module docstring
        super().__init__([{"params": placeholders}], defaults)
        self.table_state: dict[str, dict[str, Tensor]] = {
            name: self._new_table_state(table.device) for name, table in self.tables.items()
        }
        self.grad_accum_steps = 1
        # Each table's scalars as loaded (Python numbers; () for the initial ones): tables with
        # equal entries hold equal scalars, as every step advances all of them alike.
        self._scalar_values: dict[str, tuple] = {name: () for name in self.tables}
        for table in self.tables.values():
            self._slots(table)

    # -- subclass interface ----------------------------------------------------------------------

    def _new_table_state(self, device: torch.device) -> dict[str, Tensor]:
        """The per-table scalars at step 0: one-element tensors on ``device`` (module docstring)."""
        return {"step": torch.zeros((), dtype=torch.int64, device=device)}

    def _table_state(self, name: str, table: HashTable) -> dict[str, Tensor]:
        """``table_state[name]``, moved to the table's device if the table moved (e.g. ``model.to``
        after the optimizer was built); a metadata check, no sync."""
        state = self.table_state[name]
        device = table.device
        if any(value.device != device for value in state.values()):
            state = self.table_state[name] = {key: value.to(device) for key, value in state.items()}
        return state

    @abstractmethod
    def _slot_specs(self, table: HashTable) -> dict[str, tuple[int, float]]:
        """``{slot name: (width, initial value)}``."""

    def _advance(self, states: list[dict[str, Tensor]], group: dict[str, Any]) -> list[Any]:
        """Advance every table's scalars other than ``step`` (``step`` advances with the tables'
        own steps, in ``step``) by one step, in place, with a few ``torch._foreach_*`` ops for all
        tables (not a few small ops per table: host dispatch is what a step of small tables
        costs); returns, per table, what its ``_update`` needs of them."""
        return [None] * len(states)

    @abstractmethod
    def _update(self, param: Tensor, scalars: Any, slots: dict[str, Tensor], rows: Tensor, grads: Tensor,
                group: dict[str, Any]) -> None:
        """Update ``rows`` of ``param`` (a table's rows, or its storage's) and ``slots`` in place
        (``rows`` unique, each with a gradient of ``param``'s width); ``scalars`` is the table's
        entry of ``_advance``'s result."""

    def _couples_columns(self) -> bool:
        """Whether a row's update reads all of its columns together (row-wise Adagrad's mean):
        then the zero columns that pad a narrow table's rows (``table_storage``: mixed dims) must
        not enter it, and such a storage's tables are updated one by one."""
        return False

    def _slots(self, table: HashTable) -> dict[str, Tensor]:
        return {name: table.slot(name, width, init) for name, (width, init) in self._slot_specs(table).items()}

    # -- torch.optim.Optimizer -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError(f"{type(self).__name__}: sparse optimizers have one param group; build another optimizer")
        super().add_param_group(param_group)

    def set_grad_accum_steps(self, steps: int) -> None:
        """Average ``"worker"`` tables' gradients over ``steps`` micro-batches (module docstring)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{type(self).__name__}: grad accumulation steps must be an int >= 1, got {steps!r}")
        self.grad_accum_steps = steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every table's pending gradients."""
        for table in self.tables.values():
            table.clear_grads()

    @torch.no_grad()
    def step(self, closure=None):
        """Update every table's rows that have a gradient; advance every table's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        tables = list(self.tables.values())
        if is_distributed():  # sharded tables: every rank's gradients of the ids this rank owns
            units = [[i] for i in range(len(tables))]
            merged = reduce_grads_to_owners(tables)
        else:
            units = self._update_units(list(self.tables), tables)
            merged = [tables[unit[0]].take_grads() if len(unit) == 1 else take_storage_grads([tables[i] for i in unit])
                      for unit in units]
        states = [self._table_state(name, table) for name, table in self.tables.items()]
        # the tables' own steps (the eviction clock) and this optimizer's in one launch; nothing
        # below reads either
        HashTable.advance_steps(tables, [state["step"] for state in states])
        scalars = self._advance(states, group)
        for unit, (rows, grads) in zip(units, merged):
            table = tables[unit[0]]
            if table.grad_reduce_by == "worker" and self.grad_accum_steps != 1:
                grads = grads / self.grad_accum_steps
            if len(unit) > 1:  # the whole storage, at its rows' full width (``take_storage_grads``'s)
                storage = table.storage
                param = storage.embedding
                slots = {name: storage.slot(name, storage.slot_width(width, table.dim), init, table.name)
                         for name, (width, init) in self._slot_specs(table).items()}
            else:
                param, slots = table.embedding, self._slots(table)
            # the unit's tables share the storage, the hyperparameters and equal scalars
            self._update(param, scalars[unit[0]], slots, rows, grads, group)  # no rows: only the counters move
        return loss

    def _update_units(self, names: list[str], tables: list[HashTable]) -> list[list[int]]:
        """The tables (indices into ``tables``, named ``names``) that one update serves: every
        member of a storage together when all of them are this optimizer's and their scalars are
        equal (module docstring), else each table alone."""
        by_storage: dict[int, list[int]] = {}
        for i, table in enumerate(tables):
            by_storage.setdefault(id(table.storage), []).append(i)
        units = []
        for unit in by_storage.values():
            storage = tables[unit[0]].storage
            whole = len(unit) == len(storage.members) and not (
                self._couples_columns() and any(t.dim != storage.dim for t in storage.members))
            in_step = len({self._scalar_values[names[i]] for i in unit}) == 1
            units.extend([unit] if whole and in_step else [[i] for i in unit])
        return units

    # -- state_dict ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every table's state keyed by table name, and the param group (module docstring)."""
        state = {}
        for name, table in self.tables.items():
            ids, rows = table.items()
            entry: dict[str, Tensor] = {key: value.reshape(()).clone() for key, value in self.table_state[name].items()}
            entry["ids"] = ids
            for slot_name, slot in self._slots(table).items():
                entry[f"slot.{slot_name}"] = slot[rows]
            state[name] = entry
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        group["params"] = list(range(len(self.tables)))
        return {"state": state, "param_groups": [group]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (module docstring); validates everything first."""
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError(f"{owner}: a state dict has exactly the keys 'state' and 'param_groups'")
        saved, groups = state_dict["state"], state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"{owner}: expected one param group, got {len(groups)}")
        unknown = sorted(set(saved) - set(self.tables))
        if unknown:
            raise ValueError(f"{owner}: the state dict has state for unknown table(s) {unknown}")
        missing = sorted(set(self.tables) - set(saved))
        if missing:
            raise ValueError(f"{owner}: the state dict has no state for table(s) {missing}")
        plan = []
        for name, table in self.tables.items():
            entry = saved[name]
            scalars = self._new_table_state(table.device)
            absent = [key for key in ["ids", *scalars] if key not in entry]
            if absent:
                raise ValueError(f"{owner}: the state of table {name!r} lacks {absent}")
            ids = entry["ids"]
            if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
                raise ValueError(f"{owner}: the state of table {name!r}: ids must be a 1-D int64 tensor")
            ids = ids.to(table.keys.device)
            rows = table.find(ids)
            absent_ids = ids[rows < 0]
            if absent_ids.numel():
                raise ValueError(
                    f"{owner}: table {name!r} lacks {absent_ids.numel()} of the {ids.numel()} ids in the state "
                    f"(e.g. id {int(absent_ids[0])}); load the model's state first"
                )
            values = {}
            for slot_name, (width, _) in self._slot_specs(table).items():
                key = f"slot.{slot_name}"
                value = entry.get(key)
                if not isinstance(value, Tensor) or tuple(value.shape) != (ids.numel(), width):
                    got = tuple(value.shape) if isinstance(value, Tensor) else value
                    raise ValueError(f"{owner}: table {name!r}: {key} must be a tensor of shape "
                                     f"({ids.numel()}, {width}), got {got}")
                values[slot_name] = value
            for key, default in scalars.items():
                value = entry[key]
                if not isinstance(value, Tensor):  # a Python number, as numbers (float64 for floats)
                    value = torch.tensor(int(value) if default.dtype == torch.int64 else float(value))
                if value.numel() != 1:
                    raise ValueError(f"{owner}: table {name!r}: {key} must be a scalar, got shape {tuple(value.shape)}")
                scalars[key] = value.reshape(default.shape).to(device=default.device, dtype=default.dtype)
            plan.append((name, table, rows, values, scalars))
        for name, table, rows, values, scalars in plan:
            slots = self._slots(table)
            for slot_name, value in values.items():
                slots[slot_name][rows] = value.to(device=rows.device, dtype=torch.float32)
            state = self._table_state(name, table)
            for key, value in scalars.items():  # in place: a compiled step keeps its tensors
                state[key].copy_(value)
            self._scalar_values[name] = tuple(value.item() for _, value in sorted(scalars.items()))
        group = self.param_groups[0]
        group.update({key: value for key, value in groups[0].items() if key not in ("params", "param_names")})
