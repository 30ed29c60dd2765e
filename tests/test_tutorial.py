"""The seed tutorial runs on fxrec (SPEC §0), and its example trains under torchrun.

``test_tutorial_code_runs``: the tutorial's OWN code, extracted from every ``.. code-block::
python`` of ``seed_ctr_example.rst`` and concatenated in order, with exactly these changes:

- ``recis`` -> ``fxrec`` everywhere (the compatibility promise), and the ``Hash`` import the
  tutorial forgot (``from fxrec.features.op import Hash``) prepended;
- on the CPU (the ``cpu`` case; the ``cuda`` case, marked ``gpu``, keeps the tutorial's devices):
  ``torch.device("cuda")`` -> ``torch.device("cpu")`` (the embedding options), ``device="cuda"``
  -> ``device="cpu"`` (the dataset), and ``nn.Module.cuda`` patched to return the module
  unchanged (``deepctr_model.cuda()``);
- sizes, through the tutorial's own variables and arguments: ``bs = 2047`` -> ``bs = 64`` and
  ``file_num = 10`` -> ``file_num = 2`` (data generation), ``batch_size=1024`` ->
  ``batch_size=32`` (IOArgs; 128 rows make 4 batches a pass, re-read for its 100 steps);
- the main entry (``if __name__ == "__main__":``) does not run (the code is executed under
  another ``__name__``): its ``set_num_threads`` asks for ``cpu_count() // 16`` threads (0 on a
  small machine) and ``torch.cuda.set_device``, and ``dist.init_process_group()`` needs torchrun;
  the test calls what it calls otherwise, ``set_seed(42)`` then ``train()``, in a temporary
  working directory (``./fake_data/``, ``./ckpt/``).

Everything else — sequences of up to 1999 ids and strings, truncation and tiles of 1000, the
32056-wide dense input, AdamW + SparseAdamWTF, 100 steps, log_steps 10, the checkpoint — runs as
written.

``test_tutorial_code_under_torchrun``: the same extracted code (the same renaming, sizes and CPU
changes) written to a script and run as the tutorial says, ``python -m torch.distributed.run
--standalone --nproc_per_node=2 seed_ctr_example.py`` (gloo, CPU; GPUs hidden), so its main entry
runs as written except for these changes (``TORCHRUN_SUBSTITUTIONS``, ``CPU_PREAMBLE``):

- the in-process test's patch of ``nn.Module.cuda`` (returns the module unchanged) is the first
  thing the script does;
- every rank runs the data generation (module level, before the main entry): each file is written
  under a name of its own (``data_<i>.orc.<pid>``, outside ``./fake_data/``) and renamed into
  place, so no rank reads a file another rank is still writing (each rank's random rows differ;
  a reader sees one whole file, whichever rank's);
- ``set_num_threads``: ``cpu_count() // 16`` threads -> at least 1 (0 is an error on a machine
  of fewer than 16 cores), and ``torch.cuda.set_device(RANK)`` -> nothing (no CUDA device);
- ``dist.init_process_group()`` -> ``dist.init_process_group("gloo")`` (CPU tensors; on a GPU
  machine, whose GPUs the test hides, the default would also set up NCCL);
- ``train_steps=100`` -> ``train_steps=30`` (time: two ranks on two cores run ~6 steps/s; the
  loss has fallen by far more than half by step 30).

``test_example_under_torchrun``: ``torchrun --nproc_per_node=2 -m examples.deepctr.train`` (on the
CPU with gloo, also on GPU machines) on tiny generated data with an odd number of files (the
ranks' shards differ in size).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from fxrec.framework.checkpoint import CheckpointManager
from fxrec.framework.metrics import clear_metrics
from tests.trainer_util import load_parts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A verbatim copy of the tutorial the project follows, kept with the tests so that every checkout
# (CI's clean clone, a GPU host) runs the same text.
TUTORIAL = os.path.join(REPO, "tests", "data", "seed_ctr_example.rst")

SUBSTITUTIONS = [
    ("recis", "fxrec"),
    ("bs = 2047", "bs = 64"),
    ("file_num = 10", "file_num = 2"),
    ("batch_size=1024", "batch_size=32"),
]
CPU_SUBSTITUTIONS = [
    ('torch.device("cuda")', 'torch.device("cpu")'),
    ('device="cuda"', 'device="cpu"'),
]

# The tutorial's own main entry under torchrun on the CPU (module docstring).
CPU_PREAMBLE = """\
import torch
torch.nn.Module.cuda = lambda self, device=None: self  # CPU: deepctr_model.cuda() keeps the module
"""
TORCHRUN_SUBSTITUTIONS = [
    ('orc.write_table(table, os.path.join(file_dir, "data_{}.orc".format(i)))',
     'orc.write_table(table, f"data_{i}.orc.{os.getpid()}")\n'
     '    os.replace(f"data_{i}.orc.{os.getpid()}", os.path.join(file_dir, "data_{}.orc".format(i)))'),
    ("cpu_num = cpu_count() // 16", "cpu_num = max(1, cpu_count() // 16)"),
    ('torch.cuda.set_device(int(os.getenv("RANK", "-1")))', "pass  # CPU: no CUDA device to set"),
    ("dist.init_process_group()", 'dist.init_process_group("gloo")'),
    ("train_steps=100", "train_steps=30"),
]


def python_blocks(rst: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of an rst text, in order."""
    blocks, lines, i = [], rst.splitlines(), 0
    while i < len(lines):
        if re.match(r"\s*\.\. code-block::\s*python\s*$", lines[i]):
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
            blocks.append("\n".join(line[indent:] for line in body).strip("\n"))
        else:
            i += 1
    return blocks


def tutorial_source(cpu: bool = True, torchrun: bool = False) -> str:
    """The tutorial's code with ``SUBSTITUTIONS`` (and ``CPU_SUBSTITUTIONS`` when ``cpu``); with
    ``torchrun``, the script run by ``test_tutorial_code_under_torchrun`` (CPU only)."""
    with open(TUTORIAL) as f:
        blocks = python_blocks(f.read())
    source = "\n\n".join(blocks)
    for old, new in SUBSTITUTIONS + (CPU_SUBSTITUTIONS if cpu else []):
        assert old in source, f"the tutorial no longer contains {old!r}"
        source = source.replace(old, new)
    for old, new in TORCHRUN_SUBSTITUTIONS if torchrun else []:
        assert source.count(old) == 1, f"the tutorial no longer contains {old!r} (once)"
        source = source.replace(old, new)
    source = "from fxrec.features.op import Hash\n" + source
    if torchrun:
        assert cpu, "the torchrun script is for the CPU"
        source = CPU_PREAMBLE + source
    return source


def test_extracts_every_python_block():
    with open(TUTORIAL) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) == 13
    assert blocks[0].startswith("import os") and blocks[-1].startswith("import torch.distributed as dist")
    assert "recis" not in tutorial_source()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tutorial_code_runs(tmp_path, monkeypatch, device):
    """On CPU with the changes the module docstring lists; on CUDA (a GPU machine) with only the
    renaming and the sizes: the tutorial's own devices."""
    monkeypatch.chdir(tmp_path)
    if device == "cpu":
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    clear_metrics()
    module = types.ModuleType("seed_ctr_example")  # a real module: the tutorial's @dataclass needs one
    monkeypatch.setitem(sys.modules, module.__name__, module)
    source = tutorial_source(cpu=device == "cpu")
    exec(compile(source, "seed_ctr_example.rst", "exec"), module.__dict__)  # writes ./fake_data/
    namespace = module.__dict__
    assert sorted(os.listdir("fake_data")) == ["data_0.orc", "data_1.orc"]
    namespace["set_seed"](42)
    namespace["train"]()
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, 101, 10))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]  # it learns the 128 rows by heart
    assert all(0.0 <= r["metrics"]["auc"] <= 1.0 for r in records) and records[-1]["metrics"]["auc"] > 0.9
    manager = CheckpointManager(tmp_path / "ckpt")
    assert manager.latest_step() == 100
    parts = manager.load(parts=["sparse.shard0", "trainer"])
    assert parts["trainer"]["global_step"] == 100
    assert set(parts["sparse.shard0"]) == {"sparse1", "sparse2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"}


def test_tutorial_code_under_torchrun(tmp_path):
    """The tutorial's code as a script under ``torchrun --standalone --nproc_per_node=2`` (module
    docstring): both ranks exit 0, rank 0 logs a falling loss and the AUC every 10 steps and
    writes the final checkpoint (with both ranks' IO state)."""
    script = tmp_path / "seed_ctr_example.py"
    script.write_text(tutorial_source(cpu=True, torchrun=True))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # torchrun: 0 when every rank exits 0
    assert sorted(os.listdir(tmp_path / "fake_data")) == ["data_0.orc", "data_1.orc"]
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0]
    assert all(0.0 <= r["metrics"]["auc"] <= 1.0 for r in records)
    manager = CheckpointManager(tmp_path / "ckpt")
    assert manager.list_steps() == [30]
    parts = manager.load(parts=["sparse.shard0", "sparse.shard1", "trainer", "io"])
    assert parts["trainer"]["world_size"] == 2 and parts["trainer"]["global_step"] == 30
    assert [s["worker_idx"] for s in parts["io"]] == [0, 1]
    tables = {"sparse1", "sparse2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"}
    assert set(parts["sparse.shard0"]) == set(parts["sparse.shard1"]) == tables


def test_example_under_torchrun(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    # CPU and gloo even on a GPU machine (two ranks on one GPU would not work with NCCL)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    # --standalone: the rendezvous binds a free port itself (no port to race for)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "examples.deepctr.train", "--steps", "8", "--batch-size", "16", "--seq-len", "20",
           "--rows", "40", "--files", "3", "--max-seq-len", "50", "--log-steps", "2",
           "--data-dir", str(data), "--output-dir", str(out)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((out / f"tables_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 8  # both ranks ran the same steps and ended together
    merged = load_parts(out)["sparse"]  # every rank's shard, at world size 1
    for name, table in merged.items():  # sharded: the ranks' disjoint shards add up to the checkpoint's ids
        assert ranks[0]["tables"][name]["ids"] + ranks[1]["tables"][name]["ids"] == table["ids"].numel()
    assert ranks[0]["tables"]["sparse4"]["ids"] > 0 and ranks[1]["tables"]["sparse4"]["ids"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # rank 0 writes it
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == [2, 4, 6, 8] and all(math.isfinite(x) for x in losses)
    assert CheckpointManager(out).list_steps() == [8]  # rank 0 wrote the final checkpoint
    parts = CheckpointManager(out).load(parts=["io", "trainer"])
    assert len(parts["io"]) == 2 and [s["worker_idx"] for s in parts["io"]] == [0, 1]
    assert parts["trainer"]["world_size"] == 2


@pytest.mark.slow
def test_example_trains_compiled_with_passes(tmp_path, monkeypatch):
    """``--compile --passes``: the example trains (the forward and backward compiled, the engines'
    passes on: the compiled graph holds the passes' ops) and its tables hold ids."""
    from examples.deepctr import train

    monkeypatch.chdir(tmp_path)
    train.main(["--compile", "--passes", "--steps", "3", "--batch-size", "8", "--seq-len", "4", "--rows", "16",
                "--files", "1", "--max-seq-len", "8", "--log-steps", "1"])
    ranks = json.loads((tmp_path / "ckpt" / "tables_rank0.json").read_text())
    assert ranks["step"] == 3 and all(t["ids"] > 0 for t in ranks["tables"].values())
