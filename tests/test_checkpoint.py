"""fxrec.framework.checkpoint (SPEC §7.1): bit-exact round trips of real training state (dense
model + HashTable, AdamW, SparseAdamWTF, LR schedulers, IO state) and of hypothesis-drawn nested
structures; pointer file, listing, pruning; corruption detection; crash safety, with child
processes SIGKILLed at chosen points of a save."""

import collections
import copy
import json
import math
import os
import pathlib
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxrec.framework import checkpoint as ckpt_mod
from fxrec.framework.checkpoint import CheckpointManager, write_file_atomically
from fxrec.nn.initializers import UniformInitializer
from fxrec.nn.modules.hashtable import HashTable
from fxrec.optim import SparseAdamWTF

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
          torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2]


# -- exact comparison ---------------------------------------------------------------------------

def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().resolve_conj().resolve_neg().cpu().reshape(-1)
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t)  # unit strides (.contiguous() may keep odd ones)
    return bytes(flat.view(torch.uint8).numpy())


def assert_same(a, b, path="<root>"):
    """``a`` and ``b`` are the same nested state: types (int vs float vs bool, tuple vs list, dict vs
    OrderedDict, key types and order), tensor dtypes, shapes and bytes, floats to the bit."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), \
        f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor bytes differ"
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), f"{path}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{path}: keys {ka} vs {kb}"
        for x, y in zip(ka, kb):
            assert_same(x, y, f"{path}/key {x!r}")
        for x, y in zip(ka, kb):
            assert_same(a[x], b[y], f"{path}/{x!r}")
        if isinstance(a, collections.OrderedDict):
            assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), f"{path}/_metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# -- realistic training state -------------------------------------------------------------------

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = HashTable([4], name="user", initializer=UniformInitializer(-1.0, 1.0))
        self.tower = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, ids):
        return self.tower(self.emb(ids)).sum()


def training_setup():
    torch.manual_seed(0)
    model = Model()
    dense = torch.optim.AdamW(model.tower.parameters(), lr=1e-2)
    sparse = SparseAdamWTF([model.emb], lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(dense, max_lr=0.1, total_steps=10)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(dense)
    return model, dense, sparse, sched, plateau


def train_step(model, dense, sparse, sched, ids):
    dense.zero_grad()
    sparse.zero_grad()
    model(ids).backward()
    dense.step()
    sparse.step()
    sched.step()


def training_parts(model, dense, sparse, sched, plateau, step):
    return {
        "model": model.state_dict(),
        "dense_optimizer": dense.state_dict(),
        "sparse_optimizer": sparse.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "plateau": plateau.state_dict(),  # best = mode_worse = inf
        "hashtable": model.emb.state_dict(),
        "trainer": {"global_step": step, "metrics": {"auc": (0.5, 0.75), "loss": None}},
        "io_rank0": {"format": 1, "epoch": 0, "file_index": 2, "row": 17, "file": "part-0.parquet"},
        "io_rank1": {"format": 1, "epoch": 0, "file_index": 3, "row": 0, "file": None},
        "misc": [None, (1, 2.0, "x"), {0: "int key", "0": "str key", -1: [], (): ()}, float("nan"), -0.0, 2**80],
    }


def by_id(state):
    """``state`` with every table's per-row tensors (``<prefix>ids`` and its ``<prefix>*`` siblings
    of as many rows) sorted by id: row order is not state (a loaded table places ids anew)."""
    if isinstance(state, dict):
        state = type(state)((k, by_id(v)) for k, v in state.items())
        for key in [k for k in state if isinstance(k, str) and (k == "ids" or k.endswith(".ids"))]:
            prefix, order = key[:-3], torch.argsort(state[key])
            for k, v in state.items():
                if k.startswith(prefix) and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == order.numel():
                    state[k] = v[order]
    elif isinstance(state, (list, tuple)):
        state = type(state)(by_id(v) for v in state)
    return state


def test_round_trip_real_training_state_and_resume_bit_exactly(tmp_path):
    model, dense, sparse, sched, plateau = training_setup()
    ids = torch.tensor([3, -7, 2**62, 3, -(2**63)])
    train_step(model, dense, sparse, sched, ids)
    parts = training_parts(model, dense, sparse, sched, plateau, 1)
    snapshot = copy.deepcopy(parts)
    assert isinstance(next(iter(parts["dense_optimizer"]["state"])), int)  # int keys
    manager = CheckpointManager(tmp_path / "out")
    path = manager.save(1, parts)
    assert path == tmp_path / "out" / "ckpt_1"
    assert_same(parts, snapshot)  # the caller's state is untouched
    loaded = manager.load()
    assert list(loaded) == list(parts)
    assert_same(loaded, parts)
    assert loaded["model"]._metadata == parts["model"]._metadata

    # A fresh run restored from the checkpoint takes the next step exactly as the original does.
    model2, dense2, sparse2, sched2, plateau2 = training_setup()
    model2.load_state_dict(loaded["model"])
    dense2.load_state_dict(loaded["dense_optimizer"])
    sparse2.load_state_dict(loaded["sparse_optimizer"])
    sched2.load_state_dict(loaded["lr_scheduler"])
    plateau2.load_state_dict(loaded["plateau"])
    more = torch.tensor([3, 5, -7, 11])
    train_step(model, dense, sparse, sched, more)
    train_step(model2, dense2, sparse2, sched2, more)
    assert_same(by_id(training_parts(model2, dense2, sparse2, sched2, plateau2, 2)),
                by_id(training_parts(model, dense, sparse, sched, plateau, 2)))


def test_views_shared_storage_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weight = nn.Parameter(torch.randn(3, 2))
    state = {
        "base": base, "again": base, "row": base[1], "cols": base[:, 1:3], "t": base.t(), "empty_view": base[2:2],
        "scalar_view": base[3, 4], "param": weight, "tied": (weight, weight),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2), "conj": torch.tensor([1 + 2j], dtype=torch.complex64).conj(),
        "neg": torch.tensor([1.0, -2.0])._neg_view(),
    }
    ptrs = {k: v.data_ptr() for k, v in state.items() if isinstance(v, torch.Tensor)}
    snapshot = copy.deepcopy(state)
    manager = CheckpointManager(tmp_path)
    manager.save(0, {"s": state})
    assert {k: v.data_ptr() for k, v in state.items() if isinstance(v, torch.Tensor)} == ptrs
    assert_same(state, snapshot)
    loaded = manager.load(0)["s"]
    for key, value in state.items():
        expected = tuple(v.detach().resolve_conj().resolve_neg() for v in value) if isinstance(value, tuple) \
            else value.detach().resolve_conj().resolve_neg()
        assert_same(loaded[key], expected, key)
        assert not any(t.requires_grad for t in (loaded[key] if isinstance(value, tuple) else [loaded[key]]))
    loaded["base"][0, 0] = 100.0  # each loaded tensor is its own, writable
    assert loaded["again"][0, 0] == 0.0 and manager.load(0)["s"]["base"][0, 0] == 0.0


def test_parts_with_no_tensors_and_bare_leaves(tmp_path):
    manager = CheckpointManager(tmp_path)
    parts = {"a": 5, "b": None, "c": torch.tensor(True), "d": [], "e": {}, "f.g-h": "text", "E": float("-inf")}
    manager.save(3, parts)
    assert_same(manager.load(3), parts)
    assert_same(manager.load(3, parts=["E", "a"]), {"E": float("-inf"), "a": 5})
    manager.save(4, {})
    assert manager.load() == {}


# -- hypothesis: arbitrary nested structures ----------------------------------------------------

@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=gen)
    t = (raw % 2).bool() if dtype == torch.bool else raw.view(dtype)  # every bit pattern: NaNs, -0.0, ...
    t = t.reshape(shape)
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if layout == "strided":
        t = torch.stack([t, t], dim=-1)[..., 1]
    elif layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    return t


keys = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
                    lambda k: st.lists(k, max_size=2).map(tuple), max_leaves=3)
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), tensors())
trees = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.lists(children, max_size=4).map(tuple),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 3)), children, max_size=4),
    st.dictionaries(keys, children, max_size=3).map(collections.OrderedDict),
), max_leaves=12)
part_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,6}", fullmatch=True)


@given(parts=st.dictionaries(part_names, trees, max_size=3), step=st.integers(0, 2**40))
def test_round_trip_of_random_nested_structures(tmp_path_factory, parts, step):
    snapshot = copy.deepcopy(parts)
    manager = CheckpointManager(tmp_path_factory.mktemp("h"))
    manager.save(step, parts)
    assert_same(parts, snapshot)
    assert manager.latest_step() == step
    assert_same(manager.load(), parts)


@pytest.mark.parametrize("bad, where", [
    ({"x": [1, np.int64(3)]}, "x/1"),
    ({"y": {3: {1, 2}}}, "y/3"),
    ({"z": torch.zeros(2, dtype=torch.complex128)}, "z"),
    ({"s": torch.zeros(3).to_sparse()}, "s"),
    ({frozenset(): 1}, "<root>"),
    ({"n": collections.namedtuple("P", "a b")(1, 2)}, "n"),
])
def test_unstorable_values_are_type_errors_naming_their_path(tmp_path, bad, where):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"ok": 1})
    with pytest.raises(TypeError, match=f"checkpoint: {where}:"):
        manager.save(2, {"first": torch.ones(3), "bad": bad})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt_1"]  # no temp dir left, nothing changed
    assert manager.latest_step() == 1


def test_argument_errors(tmp_path):
    manager = CheckpointManager(tmp_path)
    for name in ["", ".hidden", "a/b", "-x", "ü", 3]:
        with pytest.raises(ValueError, match="part name"):
            manager.save(1, {name: 1})
    for step in [True, 1.0, "1"]:
        with pytest.raises(TypeError, match="step"):
            manager.save(step, {})
    with pytest.raises(ValueError, match="step"):
        manager.save(-1, {})
    with pytest.raises(TypeError, match="dict"):
        manager.save(1, [("a", 1)])
    for bad in [-1, 1.5, True]:
        with pytest.raises(ValueError, match="max_to_keep"):
            CheckpointManager(tmp_path, max_to_keep=bad)
    manager.save(np.int64(2), {"a": 1})
    assert manager.list_steps() == [2]
    with pytest.raises(KeyError, match="no part"):
        manager.load(parts=["a", "b"])


# -- listing, pointer, pruning ------------------------------------------------------------------

def test_empty_or_missing_output_dir(tmp_path):
    for path in [tmp_path, tmp_path / "missing"]:
        manager = CheckpointManager(path)
        assert manager.latest_step() is None and manager.list_steps() == []
        with pytest.raises(FileNotFoundError, match=str(path)):
            manager.load()
    assert not (tmp_path / "missing").exists()


def test_pointer_list_steps_pruning_and_loading_a_step(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    for step in [1, 2, 10, 11]:
        manager.save(step, {"trainer": {"global_step": step}})
    assert manager.list_steps() == [10, 11] and manager.latest_step() == 11
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt_10", "ckpt_11"]
    assert json.loads((tmp_path / "checkpoint").read_text()) == {"step": 11, "dir": "ckpt_11"}
    assert manager.load(10) == {"trainer": {"global_step": 10}}
    with pytest.raises(FileNotFoundError, match="ckpt_2"):
        manager.load(2)
    manager.save(5, {"trainer": {"global_step": 5}})  # never prunes the one just written
    assert manager.list_steps() == [5, 11] and manager.latest_step() == 5
    assert manager.load() == {"trainer": {"global_step": 5}}
    assert CheckpointManager(tmp_path).latest_step() == 5  # from the pointer file

    for keep_all in [None, 0]:
        out = tmp_path / f"keep_{keep_all}"
        manager = CheckpointManager(out, max_to_keep=keep_all)
        for step in range(7):
            manager.save(step, {"s": step})
        assert manager.list_steps() == list(range(7))


def test_saving_a_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=1)
    manager.save(1, {"a": torch.zeros(3), "b": 1})
    manager.save(1, {"a": torch.ones(2)})
    assert_same(manager.load(), {"a": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt_1"]
    assert sorted(os.listdir(tmp_path / "ckpt_1")) == ["a.safetensors", "index.json"]


def test_index_json_layout(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(7, {"model": {"w": torch.ones(2)}, "trainer": {"global_step": 7}})
    index = json.loads((tmp_path / "ckpt_7" / "index.json").read_text())
    assert index["step"] == 7 and index["parts"] == ["model", "trainer"]
    assert set(index["files"]) == {"model.safetensors", "trainer.safetensors"}
    for name, entry in index["files"].items():
        data = (tmp_path / "ckpt_7" / name).read_bytes()
        assert entry == {"crc32c": f"{ckpt_mod.google_crc32c.value(data):08x}", "bytes": len(data)}


def test_write_file_atomically(tmp_path):
    path = tmp_path / "f"
    write_file_atomically(path, b"one")
    write_file_atomically(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["f"]


# -- corruption ---------------------------------------------------------------------------------

def flip_byte(path: pathlib.Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flip a tensor byte": ("model.safetensors", lambda p: flip_byte(p, -3)),
    "flip a header byte": ("trainer.safetensors", lambda p: flip_byte(p, 20)),
    "truncate": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-8])),
    "append": ("trainer.safetensors", lambda p: p.write_bytes(p.read_bytes() + b"\0")),
    "delete": ("model.safetensors", lambda p: p.unlink()),
    "garbage index": ("index.json", lambda p: p.write_text("{not json")),
    "truncated index": ("index.json", lambda p: p.write_bytes(p.read_bytes()[:40])),
    "index digit changed": ("index.json", lambda p: p.write_text(p.read_text().replace('"step": 3', '"step": 4'))),
    "index crc changed": ("index.json", lambda p: p.write_text(
        p.read_text().replace(json.loads(p.read_text())["files"]["model.safetensors"]["crc32c"], "00000000"))),
    "delete index": ("index.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corruption_is_a_value_error_naming_the_file(tmp_path, corruption):
    manager = CheckpointManager(tmp_path)
    manager.save(2, {"model": {"w": torch.arange(1000.0)}, "trainer": {"global_step": 2}})
    manager.save(3, {"model": {"w": torch.arange(1000.0)}, "trainer": {"global_step": 3}})
    filename, corrupt = CORRUPTIONS[corruption]
    corrupt(tmp_path / "ckpt_3" / filename)
    for parts in [None, ["trainer"], ["model"]]:  # every file is verified, whatever is loaded
        with pytest.raises(ValueError, match=f"ckpt_3/{filename}"):
            manager.load(parts=parts)
    assert manager.load(2)["trainer"] == {"global_step": 2}


def test_corrupt_pointer_file(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"a": 1})
    (tmp_path / "checkpoint").write_text("garbage")
    with pytest.raises(ValueError, match="pointer"):
        manager.latest_step()


# -- crash safety -------------------------------------------------------------------------------

def test_leftovers_of_crashed_saves_are_ignored_then_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"a": torch.ones(3)})
    (tmp_path / ".ckpt_2.tmp-999999").mkdir()
    (tmp_path / ".ckpt_2.tmp-999999" / "a.safetensors").write_bytes(b"half")
    (tmp_path / ".ckpt_0.del-999999").mkdir()
    (tmp_path / "checkpoint.tmp-999999").write_text("{")
    assert manager.list_steps() == [1] and manager.latest_step() == 1
    assert_same(manager.load(), {"a": torch.ones(3)})
    manager.save(2, {"a": torch.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt_1", "ckpt_2"]


def test_checkpoint_left_under_its_old_name_is_loaded_then_restored(tmp_path):
    # The state a crash leaves while saving the pointer's own step again, between moving the
    # complete copy aside and renaming the new one in.
    manager = CheckpointManager(tmp_path)
    manager.save(4, {"a": torch.ones(3)})
    os.rename(tmp_path / "ckpt_4", tmp_path / ".ckpt_4.old-999999")
    assert manager.latest_step() == 4 and manager.list_steps() == [4]
    assert_same(manager.load(), {"a": torch.ones(3)})
    manager.save(5, {"a": torch.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt_4", "ckpt_5"]
    assert_same(manager.load(4), {"a": torch.ones(3)})


def test_failed_save_leaves_no_trace(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"a": torch.ones(3)})

    def fail(event, path):
        if event == "old_moved":
            raise OSError("disk full")
    monkeypatch.setattr(ckpt_mod, "_test_hook", fail)
    with pytest.raises(OSError, match="disk full"):
        manager.save(1, {"a": torch.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt_1"]
    assert_same(manager.load(), {"a": torch.ones(3)})


# The child loads checkpoint.py by path (not ``import fxrec``, whose Triton import costs seconds);
# it saves checkpoint 1, then, in another save, stops at ``event`` and waits to be killed.
CHILD = textwrap.dedent("""
    import importlib.util, sys, time
    import torch
    spec = importlib.util.spec_from_file_location("checkpoint", sys.argv[1])
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    exec(sys.argv[2])
    out, event = sys.argv[3], sys.argv[4]
    manager = ckpt.CheckpointManager(out, max_to_keep=1)
    manager.save(1, first_state())

    def stop(ev, path):
        if ev == event:
            print("STOPPED", path, flush=True)
            time.sleep(120)
    ckpt._test_hook = stop
    if event == "file_written":  # the first file of checkpoint 2 is a 64 MB part
        manager.save(2, {"big": torch.randn(16 << 20), **first_state()})
    elif event == "old_moved":  # saving step 1 again
        manager.save(1, {"trainer": {"global_step": -1}})
    else:
        manager.save(2, {"trainer": {"global_step": 2}})
    print("FINISHED", flush=True)
""")
STATE_SOURCE = textwrap.dedent("""
    def first_state():
        g = torch.Generator().manual_seed(1)
        return {"model": {"w": torch.randn(300, 7, generator=g), "b": torch.zeros(0, dtype=torch.bfloat16)},
                "dense_optimizer": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"betas": (0.9, 0.99)}]},
                "trainer": {"global_step": 1}}
""")


def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    namespace = {"torch": torch}
    exec(STATE_SOURCE, namespace)
    first = namespace["first_state"]()
    events = ["file_written", "old_moved", "dir_renamed"]
    children = {}
    for event in events:  # run side by side
        children[event] = subprocess.Popen(
            [sys.executable, "-c", CHILD, ckpt_mod.__file__, STATE_SOURCE, str(tmp_path / event), event],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for event, child in children.items():
        line = child.stdout.readline()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert line.startswith("STOPPED"), (event, line, child.stderr.read())
        child.stdout.close()
        child.stderr.close()

    for event in events:
        out = tmp_path / event
        manager = CheckpointManager(out, max_to_keep=1)
        entries = sorted(os.listdir(out))
        if event == "file_written":
            assert entries == [".ckpt_2.tmp-%d" % children[event].pid, "checkpoint", "ckpt_1"]
            assert os.listdir(out / entries[0]) == ["big.safetensors"]
            assert manager.list_steps() == [1]
        elif event == "old_moved":
            assert entries == [".ckpt_1.old-%d" % children[event].pid, ".ckpt_1.tmp-%d" % children[event].pid,
                               "checkpoint"]
            assert manager.list_steps() == [1]
        else:  # complete, but the pointer was not updated: not the latest
            assert entries == ["checkpoint", "ckpt_1", "ckpt_2"]
            assert manager.list_steps() == [1, 2]
        assert manager.latest_step() == 1
        assert_same(manager.load(), first)
        manager.save(2, {"trainer": {"global_step": 2}})
        assert sorted(os.listdir(out)) == ["checkpoint", "ckpt_2"]
        assert manager.latest_step() == 2 and manager.load() == {"trainer": {"global_step": 2}}
