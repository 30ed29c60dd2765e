"""The Trainer (SPEC §7, §7.1): steps, epochs, accumulation, hooks, logs, checkpoints, resume,
warm start, evaluation, eviction, errors, crash safety, and sharded tables across processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from fxrec.framework.checkpoint import CheckpointManager
from fxrec.framework.hooks import HashTableFilterHook, Hook, LoggerHook, ProfilerHook
from fxrec.framework.metrics import clear_metrics
from fxrec.framework.trainer import Trainer, TrainingArguments
from fxrec.nn.hashtable_hook import FilterHook
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseSGD
from fxrec.distributed.sharded import owner_of
from tests.trainer_util import (
    ToyModel,
    assert_matches_checkpoint,
    assert_same,
    concat_batches,
    dense_snapshot,
    load_parts,
    make_batches,
    make_trainer,
    orc_dataset,
    run_ranks,
    table_snapshot,
    write_orc,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _clean_metrics():
    clear_metrics()
    yield
    clear_metrics()


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def before_train(self, trainer, *a, **k):
        self.events.append("before_train")

    def after_train(self, trainer, *a, **k):
        self.events.append("after_train")

    def before_epoch(self, trainer, epoch, *a, **k):
        self.events.append(f"before_epoch {epoch}")

    def after_epoch(self, trainer, epoch, *a, **k):
        self.events.append(f"after_epoch {epoch}")

    def before_step(self, trainer, step, *a, **k):
        self.events.append(f"before_step {step}")

    def after_step(self, trainer, step, outputs, *a, **k):
        assert trainer.state.global_step == step
        self.events.append(f"after_step {step}")

    def after_save(self, trainer, step, path, *a, **k):
        self.events.append(f"after_save {step}")

    def before_evaluate(self, trainer, *a, **k):
        self.events.append("before_evaluate")

    def after_evaluate(self, trainer, results, *a, **k):
        self.events.append("after_evaluate")


class CountingModel(ToyModel):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        return super().forward(batch)


# -- arguments and errors ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"gradient_accumulation_steps": 0}, {"log_steps": 0}, {"train_steps": -1}, {"train_epoch": 0},
    {"eval_steps": 0}, {"save_steps": 0}, {"max_to_keep": -1}, {"save_concurrency_per_rank": 0},
    {"train_steps": None, "train_epoch": None}, {"output_dir": ""}, {"model_bank": 3}, {"compile": "yes"},
    {"gradient_accumulation_steps": True},
])
def test_training_arguments_validation(bad):
    with pytest.raises(ValueError):
        TrainingArguments(**bad)


def test_training_arguments_defaults():
    args = TrainingArguments()
    assert (args.gradient_accumulation_steps, args.output_dir, args.model_bank, args.log_steps, args.train_steps,
            args.train_epoch, args.eval_steps, args.save_steps, args.max_to_keep, args.save_concurrency_per_rank,
            args.compile) == (1, "output_dir", None, 100, None, 1, None, 1000, 5, 4, False)


def test_errors(tmp_path):
    model = ToyModel()
    with pytest.raises(TypeError):
        Trainer(model, TrainingArguments(output_dir=str(tmp_path)), [], hooks=[object()])
    with pytest.raises(TypeError):
        Trainer("not a model", TrainingArguments(output_dir=str(tmp_path)), [])
    with pytest.raises(ValueError, match="no train_dataset"):
        Trainer(model, TrainingArguments(output_dir=str(tmp_path)), None).train()
    with pytest.raises(ValueError, match="no eval_dataset"):
        Trainer(model, TrainingArguments(output_dir=str(tmp_path)), []).evaluate()
    other = ToyModel()
    with pytest.raises(ValueError, match="not the model's tables"):
        Trainer(model, TrainingArguments(output_dir=str(tmp_path)), [],
                sparse_optimizer=SparseSGD(filter_out_sparse_param(other), lr=0.1))

    class NotALoss(ToyModel):
        def forward(self, batch):
            return super().forward(batch).expand(3)

    trainer = Trainer(NotALoss(), TrainingArguments(output_dir=str(tmp_path / "x"), train_steps=1), make_batches(1, 4))
    with pytest.raises(TypeError, match="scalar"):
        trainer.train()
    with pytest.raises(RuntimeError, match="no batch"):
        make_trainer(str(tmp_path / "empty"), [], train_steps=3).train()


class NaNAt(ToyModel):
    """Its predictions are NaN from the ``at``-th forward on; AUROC sees them before the loss does."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, batch):
        self.calls += 1
        emb = self.embedding({"ids": batch["ids"], "tags": batch["tags"]})
        x = torch.cat([emb["ids"], emb["tags"], batch["dense"]], -1)
        p = torch.sigmoid(self.dense(x)).reshape(-1)
        if self.calls >= self.at:
            p = p * float("nan")
        label = batch["label"].reshape(-1)
        self.auc.update(p.detach(), label)
        return torch.nn.functional.binary_cross_entropy(p, label)


def test_bad_predictions_or_labels_name_the_step(tmp_path):
    """NaN predictions (AUROC's ValueError) from the 8th forward on: the second micro-batch of step
    4 (2 micro-batches a step, 4 batches a pass: steps 3 and 4 are epoch 1); and a label 2
    (binary_cross_entropy's RuntimeError) at step 3: the same error type, naming the step and
    epoch, the original chained."""
    batches = make_batches(4, 4)
    trainer = make_trainer(str(tmp_path / "nan"), batches, model=NaNAt(8), train_steps=10,
                           gradient_accumulation_steps=2)
    expected = r"^Trainer: step 4 \(epoch 1\): AUROC: predictions must lie in \[0, 1\]"
    with pytest.raises(ValueError, match=expected) as err:
        trainer.train()
    assert type(err.value.__cause__) is ValueError and "AUROC" in str(err.value.__cause__)
    assert trainer.state.global_step == 3

    bad = make_batches(4, 4)
    bad[2]["label"][1, 0] = 2.0
    trainer = make_trainer(str(tmp_path / "label"), bad, train_steps=4)
    expected = r"^Trainer: step 3 \(epoch 0\): .*target should be between 0 and 1"
    with pytest.raises(RuntimeError, match=expected) as err:
        trainer.train()
    assert type(err.value.__cause__) is RuntimeError and trainer.state.global_step == 2


# -- steps, epochs, accumulation ----------------------------------------------------------------

def test_exact_train_steps_across_epochs(tmp_path):
    model = CountingModel()
    trainer = make_trainer(str(tmp_path), make_batches(3, 8), model=model, train_steps=7)
    state = trainer.train()
    assert state.global_step == 7 and model.calls == 7
    assert state.epoch == 2  # two full passes, stopped 1 step into the third


def test_epochs(tmp_path):
    model = CountingModel()
    trainer = make_trainer(str(tmp_path), make_batches(3, 8), model=model, train_epoch=2)
    state = trainer.train()
    assert (state.global_step, state.epoch, model.calls) == (6, 2, 6)


def test_train_steps_stops_mid_epoch_and_continues_on_the_same_dataset(tmp_path):
    ds = orc_dataset(write_orc(str(tmp_path / "data"), files=2, rows=16), batch_size=8)  # 4 batches a pass
    trainer = make_trainer(str(tmp_path / "out"), ds, train_steps=3)
    trainer.train()
    assert ds.dump_io_state()["row"] == 8 and ds.dump_io_state()["file_index"] == 1
    trainer.args.train_steps = 5
    trainer.train()
    assert trainer.state.global_step == 5 and trainer.state.epoch == 1


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path, k):
    """k micro-batches then one step == one step on their concatenation: dense params and both
    tables ("worker" and "id" reduction). With 4 batches and k=3 the second step has one batch."""
    batches = make_batches(4, 6, seed=3)
    trainer = make_trainer(str(tmp_path), batches, sgd=True, scheduler=False, train_epoch=1,
                           gradient_accumulation_steps=k)
    trainer.train()
    groups = [batches[i:i + k] for i in range(0, len(batches), k)]
    assert trainer.state.global_step == len(groups)

    ref = ToyModel(0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sparse = SparseSGD(filter_out_sparse_param(ref), lr=0.1)
    for group in groups:
        ref(concat_batches(group)).backward()
        opt.step()
        sparse.step()
        opt.zero_grad()
        sparse.zero_grad()
    assert_same(dense_snapshot(trainer.model), dense_snapshot(ref), exact=False)
    assert_same(table_snapshot(trainer.model), table_snapshot(ref), exact=False)


# -- hooks and logs ------------------------------------------------------------------------------

def test_hooks_fire_in_order(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(str(tmp_path), make_batches(2, 4), hooks=[recorder], train_steps=3, save_steps=2)
    trainer.train()
    assert recorder.events == [
        "before_train",
        "before_epoch 0", "before_step 1", "after_step 1", "before_step 2", "after_step 2", "after_save 2",
        "after_epoch 0",
        "before_epoch 1", "before_step 3", "after_step 3",
        "after_save 3", "after_train",
    ]
    assert isinstance(trainer.hooks[0], LoggerHook)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = _Lines()
    loggers = [logging.getLogger(name) for name in ("fxrec.framework.hooks", "fxrec.framework.trainer")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.lines
    for lg in loggers:
        lg.removeHandler(handler)


def test_log_lines_and_jsonl(tmp_path, log_lines):
    trainer = make_trainer(str(tmp_path), make_batches(5, 8), train_steps=4, log_steps=2)
    trainer.train()
    lines = [line for line in log_lines if "steps/s" in line]
    assert len(lines) == 2
    for line in lines:
        assert "loss" in line and "auc" in line and "samples/s" in line
    assert "step 2/4" in lines[0] and "step 4/4" in lines[1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"step", "epoch", "loss", "metrics", "steps_per_s", "samples_per_s", "time"} <= set(r)
        assert 0.0 <= r["metrics"]["auc"] <= 1.0 and r["loss"] > 0
        assert r["samples_per_s"] == pytest.approx(8 * r["steps_per_s"], rel=1e-6)


def test_progress_display(tmp_path, capsys):
    make_trainer(str(tmp_path), make_batches(4, 8), hooks=[LoggerHook(log_steps=2, progress=True)],
                 train_steps=4).train()
    err = capsys.readouterr().err
    assert "\rstep 3/4 [" in err.replace("\033[K", "") and "steps/s" in err


def test_profiler_hook_writes_a_trace(tmp_path):
    hook = ProfilerHook(wait=0, warmup=1, active=1)
    make_trainer(str(tmp_path), make_batches(3, 4), hooks=[hook], train_steps=3).train()
    assert len(hook.traces) == 1 and os.path.getsize(hook.traces[0]) > 0
    assert os.path.dirname(hook.traces[0]) == str(tmp_path / "profile")


def test_hashtable_filter_hook_evicts(tmp_path):
    # each batch uses its own ids (disjoint ranges): ids unseen for 2 steps are evicted
    batches = make_batches(6, 4, seed=1, vocab=10)
    for i, b in enumerate(batches):
        b["ids"] = type(b["ids"])(b["ids"].values() + 100 * i, b["ids"].offsets())
    model = ToyModel(filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 2}))
    hook = HashTableFilterHook(filter_interval=1)
    trainer = make_trainer(str(tmp_path), batches, model=model, hooks=[hook], train_steps=6)
    trainer.train()
    ids = trainer.tables["ids"]
    assert hook.evicted.get("ids", 0) > 0 and "tags" not in hook.evicted  # tags has no filter hook
    live = table_snapshot(model)["ids"]["ids"]
    assert live.min() >= 500  # at step 6, ids last seen 2 table steps ago or more are gone: batch 5's are left
    assert len(ids) == live.numel()


# -- checkpoints ---------------------------------------------------------------------------------

def test_checkpoints_written_and_pruned(tmp_path):
    trainer = make_trainer(str(tmp_path), make_batches(5, 4), train_steps=5, save_steps=1, max_to_keep=2)
    trainer.train()
    manager = CheckpointManager(tmp_path)
    assert manager.list_steps() == [4, 5] and manager.latest_step() == 5
    parts = manager.load()
    assert set(parts) == {"model", "sparse.shard0", "dense_optimizer", "lr_scheduler", "sparse_optimizer.shard0",
                          "trainer", "io"}
    assert not any(k.startswith("embedding.tables") for k in parts["model"])
    assert set(parts["sparse.shard0"]) == {"ids", "tags"} and parts["trainer"]["global_step"] == 5
    assert parts["io"] == [None]  # a list of batches has no IO state
    assert "auc.tp" in parts["model"]  # metric counters are dense state


def test_save_steps_none_saves_only_at_the_end(tmp_path):
    make_trainer(str(tmp_path), make_batches(3, 4), train_steps=3, save_steps=None).train()
    assert CheckpointManager(tmp_path).list_steps() == [3]


def _run(tmp_path, name: str, data: str, train_steps: int, seed: int = 0, **args):
    trainer = make_trainer(str(tmp_path / name), orc_dataset(data, batch_size=16), seed=seed,
                           train_steps=train_steps, **args)
    trainer.train()
    return trainer


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_is_bit_identical(tmp_path, stop):
    """4 batches a pass (3 x 20 rows, B=16, last batch 12 rows): stop at 3 (mid-pass) or 4 (the
    pass's end), resume with fresh objects (other random init) to 6 == 6 uninterrupted steps."""
    data = write_orc(str(tmp_path / "data"), files=3, rows=20)
    full = _run(tmp_path, "full", data, 6)
    first = _run(tmp_path, "resumed", data, stop, save_steps=2)
    assert first.state.global_step == stop
    resumed = _run(tmp_path, "resumed", data, 6, seed=123, save_steps=2)
    assert resumed.state.global_step == 6 and resumed.state.epoch == 1
    assert_same(dense_snapshot(resumed.model), dense_snapshot(full.model))
    assert_same(table_snapshot(resumed.model), table_snapshot(full.model))
    assert resumed.sparse_optimizer.table_state == full.sparse_optimizer.table_state
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()
    assert torch.equal(resumed.model.auc.tp, full.model.auc.tp)
    assert resumed.train_dataset.dump_io_state() == full.train_dataset.dump_io_state()


def test_resume_at_another_world_size_restarts_the_epoch(tmp_path, log_lines):
    data = write_orc(str(tmp_path / "data"), files=3, rows=20)
    trainer = _run(tmp_path, "out", data, 2)
    manager = CheckpointManager(tmp_path / "out")
    parts = manager.load()
    parts["trainer"]["world_size"] = 2
    parts["io"] = parts["io"] * 2
    manager.save(2, parts)
    resumed = make_trainer(str(tmp_path / "out"), orc_dataset(data, batch_size=16), train_steps=3)
    resumed.train()
    assert any("cannot be resharded" in line for line in log_lines)
    assert resumed.state.global_step == 3
    for name, snap in table_snapshot(trainer.model).items():  # every id of the checkpoint was loaded
        assert torch.isin(snap["ids"], table_snapshot(resumed.model)[name]["ids"]).all()
    # the epoch restarted: step 3 read the pass's first batch again
    assert resumed.train_dataset.dump_io_state()["row"] == 16 and resumed.train_dataset.dump_io_state()["file_index"] == 0


def test_model_bank_warm_start(tmp_path):
    source = make_trainer(str(tmp_path / "a"), make_batches(3, 4), train_steps=3)
    source.train()
    for bank in [str(tmp_path / "a"), str(tmp_path / "a" / "ckpt_3")]:
        target = make_trainer(str(tmp_path / ("b" + str(len(bank)))), make_batches(3, 4), seed=7,
                              train_steps=0, model_bank=bank)
        target.train()
        assert target.state.global_step == 0
        assert_same(dense_snapshot(target.model), dense_snapshot(source.model))
        src, dst = table_snapshot(source.model), table_snapshot(target.model)
        for name in src:
            assert torch.equal(src[name]["ids"], dst[name]["ids"])
            assert torch.equal(src[name]["embedding"], dst[name]["embedding"])
            assert dst[name]["step"] == 0 and not dst[name]["slot.exp_avg"].any()  # fresh optimizer state
        assert all(s["step"] == 0 for s in target.sparse_optimizer.table_state.values())
        assert not target.model.auc.tp.any()  # metric counters are not warm-started


def test_resume_takes_precedence_over_model_bank(tmp_path):
    make_trainer(str(tmp_path / "a"), make_batches(3, 4), train_steps=1).train()
    make_trainer(str(tmp_path / "b"), make_batches(3, 4), train_steps=2).train()
    trainer = make_trainer(str(tmp_path / "b"), make_batches(3, 4), train_steps=2, model_bank=str(tmp_path / "a"))
    trainer.train()
    assert trainer.state.global_step == 2


# -- evaluation ----------------------------------------------------------------------------------

def test_evaluate(tmp_path):
    train, evaluation = make_batches(4, 8, seed=0), make_batches(3, 8, seed=5, vocab=80)
    trainer = make_trainer(str(tmp_path), train, eval_dataset=evaluation, train_steps=4)
    trainer.train()
    tables = {name: len(t) for name, t in trainer.tables.items()}
    tp = trainer.model.auc.tp.clone()
    results = trainer.evaluate()
    assert results["steps"] == 3 and 0 <= results["auc"] <= 1 and results["loss"] > 0
    assert {name: len(t) for name, t in trainer.tables.items()} == tables  # eval mode: no inserts
    assert torch.equal(trainer.model.auc.tp, tp) and trainer.model.training  # training metrics untouched
    with torch.no_grad():
        trainer.model.eval()
        expected = sum(float(trainer.model(b)) for b in evaluation) / 3
        trainer.model.train()
    assert results["loss"] == pytest.approx(expected, rel=1e-6)
    assert trainer.evaluate(eval_steps=1)["steps"] == 1


def test_evaluate_only_restores_the_latest_checkpoint(tmp_path):
    evaluation = make_batches(2, 8, seed=5)
    source = make_trainer(str(tmp_path), make_batches(3, 8), eval_dataset=evaluation, train_steps=3)
    source.train()
    fresh = Trainer(ToyModel(seed=9), TrainingArguments(output_dir=str(tmp_path)), None, eval_dataset=evaluation)
    assert fresh.evaluate() == source.evaluate()
    assert fresh.state.global_step == 3


def test_train_and_evaluate(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(str(tmp_path), make_batches(2, 8), eval_dataset=make_batches(2, 8, seed=9),
                           hooks=[recorder], train_epoch=2, eval_steps=1)
    results = trainer.train_and_evaluate()
    assert recorder.events.count("after_evaluate") == 2  # after each epoch (the last one also ends training)
    assert results["steps"] == 1 and results["global_step"] == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2, 4]
    trainer2 = make_trainer(str(tmp_path / "b"), make_batches(4, 8), eval_dataset=make_batches(2, 8, seed=9),
                            train_steps=4)
    trainer2.train_and_evaluate(eval_interval=3)
    assert trainer2.last_eval["global_step"] == 4


# -- crash safety ----------------------------------------------------------------------------------

_CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from fxrec.framework import checkpoint
from tests.trainer_util import ToyModel, make_trainer, orc_dataset

def kill_mid_save(event, path):
    # SIGKILL ourselves once checkpoint 4 has one part file written (fsynced) in its temp dir
    if event == "file_written" and ".ckpt_4.tmp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._test_hook = kill_mid_save
make_trainer({out!r}, orc_dataset({data!r}, batch_size=16), train_steps=6, save_steps=2,
             model=ToyModel(0, width=4096)).train()
"""


def test_sigkill_mid_save_resumes_from_the_previous_checkpoint(tmp_path):
    data = write_orc(str(tmp_path / "data"), files=3, rows=20)
    out = str(tmp_path / "out")
    child = subprocess.run([sys.executable, "-c", _CHILD.format(repo=REPO, out=out, data=data)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    manager = CheckpointManager(out)
    assert manager.latest_step() == 2
    assert any(name.startswith(".ckpt_4.tmp") for name in os.listdir(out))  # the torn save is there...
    manager.load()  # ...and the previous checkpoint verifies
    resumed = make_trainer(out, orc_dataset(data, batch_size=16), train_steps=6, save_steps=2,
                           model=ToyModel(0, width=4096))
    recorder = Recorder()
    resumed.add_hook(recorder)
    resumed.train()
    assert recorder.events[1:3] == ["before_epoch 0", "before_step 3"]  # resumed after step 2
    assert manager.list_steps() == [2, 4, 6] and not any(".tmp" in n for n in os.listdir(out))
    full = make_trainer(str(tmp_path / "full"), orc_dataset(data, batch_size=16), train_steps=6,
                        model=ToyModel(0, width=4096))
    full.train()
    assert_same(dense_snapshot(resumed.model), dense_snapshot(full.model))
    assert_same(table_snapshot(resumed.model), table_snapshot(full.model))


# -- several processes: sharded tables ------------------------------------------------------------

_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from fxrec.framework.trainer import Trainer, TrainingArguments
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseSGD
from tests.trainer_util import ToyModel, make_batches, table_snapshot

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
# a file store: no TCP port to race for with other processes on the machine
dist.init_process_group("gloo", init_method="file://" + os.path.join({out!r}, "store"), rank=rank, world_size=world)
batches = make_batches(6, 4, seed=11)
mine = batches[rank::world] if rank == 0 else batches[rank::world][:2]   # rank 1 runs out first
model = ToyModel(seed=rank)   # different init per rank: DDP broadcasts rank 0's dense weights
opt = torch.optim.SGD(model.parameters(), lr=0.1)
sparse = SparseSGD(filter_out_sparse_param(model), lr=0.1)
trainer = Trainer(model, TrainingArguments(output_dir={out!r}, train_steps=10, log_steps=1, save_steps=None),
                  mine, dense_optimizers=(opt, None), sparse_optimizer=sparse)
trainer.train()
snap = table_snapshot(model)
out = {{"step": trainer.state.global_step, "epoch": trainer.state.epoch,
        "dense": {{k: v.tolist() for k, v in model.state_dict().items() if k.startswith("dense")}},
        "tables": {{n: {{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in t.items()}} for n, t in snap.items()}}}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(out, f)
dist.barrier()  # no rank tears gloo down while another still uses it
dist.destroy_process_group()
"""


def _merged_tables(ranks: list[dict], world: int) -> dict:
    """The ranks' table shards as one table per name (ids ascending), each rank holding exactly
    the ids it owns."""
    out = {}
    for name in ranks[0]["tables"]:
        pairs = []
        for r, rank in enumerate(ranks):
            ids = rank["tables"][name]["ids"]
            assert (owner_of(torch.tensor(ids, dtype=torch.int64), world) == r).all(), (name, r)
            pairs += zip(ids, rank["tables"][name]["embedding"])
        pairs.sort()
        out[name] = {"ids": [i for i, _ in pairs], "embedding": [e for _, e in pairs]}
    return out


def test_two_processes_shard_tables_and_match_one_process(tmp_path):
    """gloo, 2 ranks: rank 0 has 3 batches a pass, rank 1 has 2 (it runs out first: both stop the
    pass together). Dense weights are bit-identical across ranks; each rank's tables hold the ids
    it owns; dense weights and the union of the shards equal (to float tolerance) one process
    training on each step's two batches concatenated."""
    out = str(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=REPO, out=out))
    run_ranks(str(script), 2, out)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["dense"] == r1["dense"]  # bit-identical (JSON floats are exact reprs)
    assert r0["step"] == r1["step"] == 10 and r0["epoch"] == r1["epoch"] == 4  # 5 passes of 2 steps
    tables = _merged_tables([r0, r1], 2)

    # one process: the same steps on the two ranks' batches concatenated
    batches = make_batches(6, 4, seed=11)
    per_rank = [batches[0::2], batches[1::2][:2]]
    ref = ToyModel(seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sparse = SparseSGD(filter_out_sparse_param(ref), lr=0.1)
    for _ in range(5):
        for i in range(2):
            ref(concat_batches([per_rank[0][i], per_rank[1][i]])).backward()
            opt.step()
            sparse.step()
            opt.zero_grad()
            sparse.zero_grad()
    dense = {k: v for k, v in ref.state_dict().items() if k.startswith("dense")}
    for k, v in dense.items():
        torch.testing.assert_close(torch.tensor(r0["dense"][k]), v, atol=1e-5, rtol=1e-5)
    for name, t in table_snapshot(ref).items():
        assert tables[name]["ids"] == t["ids"].tolist()
        torch.testing.assert_close(torch.tensor(tables[name]["embedding"]), t["embedding"], atol=1e-5, rtol=1e-5)


# -- reshard: save at world size 2, load at 1 and at 3 ----------------------------------------------

_RESHARD = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from tests.trainer_util import ToyModel, assert_matches_checkpoint, load_parts, make_batches, make_trainer, table_snapshot

out, store, saved = sys.argv[1], sys.argv[2], int(sys.argv[3])
coalesce = {coalesce}
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
batches = make_batches(6, 4, seed=11)[rank::world]
if world == 2:  # train: {steps} steps, every rank saves its shard of ckpt_{steps} at the end
    make_trainer(out, batches, model=ToyModel(rank, coalesce=coalesce), train_steps={steps}).train()
else:  # resume at another world size: every rank holds the ids it owns now, with every slot
    trainer = make_trainer(out, batches, model=ToyModel(100 + rank, coalesce=coalesce), train_steps=saved)
    assert (trainer.tables["ids"].storage is trainer.tables["tags"].storage) == coalesce
    trainer.train()  # restores, runs no step
    assert_matches_checkpoint(trainer, load_parts(out, saved, rank, world))
    trainer.args.train_steps = saved + 1
    trainer.train()  # one more step at this world size (and its checkpoint)
    snap = table_snapshot(trainer.model)
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"step": trainer.state.global_step, "tables": {{n: {{k: (v.tolist() if hasattr(v, "tolist") else v)
                   for k, v in t.items()}} for n, t in snap.items()}}}}, f)
dist.barrier()  # no rank tears gloo down while another still uses it
dist.destroy_process_group()
"""


@pytest.mark.parametrize("coalesce", [False, True], ids=["tables", "coalesced"])
def test_reshard_save_at_two_load_at_one_and_three(tmp_path, coalesce):
    """2 gloo ranks train 4 steps (each its own batches) and each saves its shard; together the
    shards hold the ids of both ranks' batches, each id once. Loaded in one process (this one)
    and in 3 processes, every rank's tables (ids, embedding, last_seen, step, optimizer moments),
    the sparse optimizer's per-table state, the dense state and the step equal the checkpoint's
    (the ids the rank owns) exactly; one more step then runs at the new world size. ``coalesced``:
    the two tables share one storage (table_coalesce) on every rank; the shards stay per logical
    table."""
    steps = 4
    script = tmp_path / "reshard.py"
    script.write_text(_RESHARD.format(repo=REPO, steps=steps, coalesce=coalesce))
    out2 = tmp_path / "w2"
    out2.mkdir()
    run_ranks(str(script), 2, str(tmp_path), [str(out2), str(tmp_path / "store2"), "0"])
    assert CheckpointManager(out2).list_steps() == [steps]
    assert {"sparse.shard0", "sparse.shard1"} <= set(CheckpointManager(out2).part_names(steps))
    parts = load_parts(out2, steps)
    batches = make_batches(6, 4, seed=11)  # 3 a rank: 4 steps read all 6
    for name, feature in (("ids", "ids"), ("tags", "tags")):
        seen = torch.unique(torch.cat([b[feature].values() for b in batches]))
        assert torch.equal(torch.sort(parts["sparse"][name]["ids"]).values, seen)  # both shards, each id once
    for world in (1, 3):
        shutil.copytree(out2, tmp_path / f"w{world}")
    # world 1: a Trainer in this process (no process group)
    trainer = make_trainer(str(tmp_path / "w1"), batches, model=ToyModel(7, coalesce=coalesce), train_steps=steps)
    assert (trainer.tables["ids"].storage is trainer.tables["tags"].storage) == coalesce
    trainer.train()
    assert_matches_checkpoint(trainer, parts)
    trainer.args.train_steps = steps + 1
    trainer.train()
    assert trainer.state.global_step == steps + 1 and CheckpointManager(tmp_path / "w1").latest_step() == steps + 1
    # world 3: three gloo processes
    out3 = tmp_path / "w3"
    run_ranks(str(script), 3, str(tmp_path), [str(out3), str(tmp_path / "store3"), str(steps)])
    ranks = [json.loads((out3 / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["step"] == steps + 1 for r in ranks)
    for name in ("ids", "tags"):  # the 3 shards are disjoint, each its owner's
        for r, rank in enumerate(ranks):
            assert (owner_of(torch.tensor(rank["tables"][name]["ids"], dtype=torch.int64), 3) == r).all()
    assert CheckpointManager(out3).list_steps() == [steps, steps + 1]
    assert {f"sparse.shard{r}" for r in range(3)} <= set(CheckpointManager(out3).part_names(steps + 1))
