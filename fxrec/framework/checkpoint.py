"""Crash-safe checkpoints of nested training state (SPEC §7.1): ``CheckpointManager``.

Layout of ``output_dir``::

    checkpoint                    the pointer file: {"step": 7, "dir": "ckpt_7"}, the latest checkpoint
    ckpt_5/ ckpt_7/               complete checkpoints, one directory per global step
        <part>.safetensors        one file per part ("model", "dense_optimizer", "io_rank0", ...)
        index.json                {"format", "step", "parts": [names, in saved order],
                                   "files": {filename: {"crc32c": 8 hex digits, "bytes": n}},
                                   "index_crc32c": crc32c of this JSON without that key}

A part is any nested state: dicts (``dict`` or ``OrderedDict``, whose ``_metadata`` — module
versions in ``nn.Module.state_dict()`` — is kept too), lists and tuples of tensors, ``None``,
``bool``, ``int``, ``float``, ``str``; dict keys are ``None``/``bool``/``int``/``float``/``str``
or tuples of them (torch optimizer state is keyed by int). Tensors are stored in the part's
safetensors file under their key path ("state/0/exp_avg"; a ``#n`` suffix keeps names unique);
the structure, with every non-tensor leaf and the type of every key, is JSON in the safetensors
header metadata (``"fxrec.tree"``). Loading rebuilds the exact structure: dtypes, shapes and
tensor bytes, int vs str keys, tuples vs lists, floats to the bit (non-finite ones are stored as
their IEEE bits). Tensors are written from contiguous CPU tensors: CUDA tensors are copied to the
CPU, non-contiguous ones are made contiguous, and one that shares storage with a tensor already
in the part (tied weights, views) is cloned (safetensors refuses shared storage). The caller's
tensors are never modified; sharing between tensors is not restored (each loads as its own).
Other leaf types (numpy scalars, enums, sparse tensors, dtypes safetensors lacks) are a
``TypeError`` naming their key path.

Saving (``save``; one writer — see "Several ranks" below):

1. Remove what crashed saves left: ``.ckpt_<s>.tmp-<pid>/`` and ``.ckpt_<s>.del-<pid>/`` dirs, and
   pointer temp files; an ``.ckpt_<s>.old-<pid>/`` (step 4's) is renamed back to ``ckpt_<s>``
   when that is missing, else removed.
2. Write every part file and then ``index.json`` into ``.ckpt_<step>.tmp-<pid>/``; fsync each
   file, then the directory.
3. If ``ckpt_<step>`` exists (saving a step again, e.g. a final save at a step that was also a
   periodic save, or after a crash between steps 5 and 6), rename it to ``.ckpt_<step>.old-<pid>``.
4. ``os.rename`` the temp dir to ``ckpt_<step>``; fsync ``output_dir``.
5. Atomically replace the pointer file (``write_file_atomically``: temp file, fsync,
   ``os.replace``, fsync ``output_dir``).
6. Remove the ``.old`` dir; prune to ``max_to_keep`` (below).

Why a crash anywhere leaves the previous checkpoint loadable: a directory named ``ckpt_<n>`` only
ever holds a complete, fsynced checkpoint (it gets that name by an atomic rename of a complete,
fsynced directory; pruning renames to ``.ckpt_<n>.del-<pid>`` before deleting), and the pointer
file always names one (it is replaced atomically, and only after the rename is durable). The one
moment the pointer's directory is absent — between steps 3 and 4 while saving the pointer's own
step again — its complete copy is the ``.old`` dir: ``load`` reads it from there, and the next
``save`` renames it back. A crash before step 5 leaves the pointer on the previous checkpoint (a
complete ``ckpt_<step>`` may then exist: ``list_steps`` shows it, ``latest_step`` does not, and
saving that step again replaces it). Loading verifies every file's size and crc32c against the
index, so torn or corrupted files (a disk, a copy, a bug) are an error, never silently loaded.

Pruning (``max_to_keep``): after the pointer names the new checkpoint, the checkpoints with the
lowest steps are removed until ``max_to_keep`` remain, never the one just written (so a
checkpoint with a higher step, from an abandoned run, outlives older ones). ``max_to_keep``
``None`` or ``0`` keeps every checkpoint.

Several ranks: ``save`` is for one writer. Its steps are public for several writers of one
checkpoint (``fxrec.distributed.checkpoint``: each rank writes its table shard): ONE process
calls ``begin_save`` (clean-up, temp dir), every writer ``write_part``s its own parts into that
temp dir (a file system all of them see) and hands its index entries to the one, which calls
``finish_save`` (index, rename, pointer): the checkpoint still becomes visible only complete.
Any number of processes may ``load`` at the same time (loading never writes). Two saves into one
``output_dir`` at once are unsupported (each removes the other's temp dirs).
"""

from __future__ import annotations

import collections
import errno
import json
import math
import operator
import os
import pathlib
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from typing import Any

import google_crc32c
import safetensors
import safetensors.torch
import torch

__all__ = ["CheckpointManager", "write_file_atomically"]

POINTER_NAME = "checkpoint"
INDEX_NAME = "index.json"
PART_SUFFIX = ".safetensors"
FORMAT = "fxrec.checkpoint/1"
_TREE_KEY = "fxrec.tree"
_FORMAT_KEY = "fxrec.format"
_CHUNK = 8 << 20

_CKPT_RE = re.compile(r"ckpt_(0|[1-9][0-9]*)")
_TMP_RE = re.compile(r"\.ckpt_(0|[1-9][0-9]*)\.tmp-[0-9]+")
_DEL_RE = re.compile(r"\.ckpt_(0|[1-9][0-9]*)\.del-[0-9]+")
_OLD_RE = re.compile(r"\.ckpt_(0|[1-9][0-9]*)\.old-[0-9]+")
_POINTER_TMP_RE = re.compile(re.escape(POINTER_NAME) + r"\.tmp-[0-9]+")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# The dtypes safetensors stores (its dtype table; float8 and unsigned ones where torch has them).
_DTYPES = frozenset(safetensors.torch._TYPES.values()) - {None}

# Test hook: called as ``_test_hook(event, path)`` at the protocol's steps, so a test can stop a
# child process there (and SIGKILL it) deterministically. Events: "file_written" (a part file or
# index.json, fsynced, in the temp dir), "old_moved" (an existing ckpt_<step> renamed to .old),
# "dir_renamed" (temp dir renamed to ckpt_<step>, pointer not yet updated), "pointer_written".
_test_hook: Callable[[str, pathlib.Path], None] | None = None


def _hook(event: str, path: pathlib.Path) -> None:
    if _test_hook is not None:
        _test_hook(event, path)


# -- durable file-system operations -------------------------------------------------------------

def _fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the names created / renamed / removed in it are durable."""
    if os.name == "nt":  # no directory fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _crc32c_of_file(path: pathlib.Path, fsync: bool = False) -> tuple[str, int]:
    """(crc32c as 8 hex digits, size in bytes) of a file's content, reading it in chunks;
    ``fsync``: also fsync the file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = google_crc32c.extend(crc, chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return f"{crc:08x}", size


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content:
    write ``<path>.tmp-<pid>``, fsync it, ``os.replace`` it onto ``path``, fsync the directory."""
    path = pathlib.Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _remove_dir(path: pathlib.Path) -> None:
    """Remove a checkpoint-like directory: renamed to a ``.del`` name first (atomic), so a crash
    mid-removal never leaves a partial directory under a name that looks complete."""
    if not path.exists():
        return
    m = _CKPT_RE.fullmatch(path.name) or _OLD_RE.fullmatch(path.name)
    if m is not None:
        doomed = path.with_name(f".ckpt_{m.group(1)}.del-{os.getpid()}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(path, doomed)
        _fsync_dir(path.parent)
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


# -- nested state <-> (JSON tree, named tensors) ------------------------------------------------

def _float_bits(x: float) -> str:
    return struct.pack(">d", x).hex()


class _Packer:
    """Flattens one part: the JSON-able tree (see ``_decode``) and the tensors it names."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def _name(self, path: list[str]) -> str:
        base = "/".join(path) or "<root>"
        name, n = base, 0
        while name in self.tensors or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        return name

    def _tensor(self, t: torch.Tensor, path: list[str]) -> dict:
        where = "/".join(path) or "<root>"
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"checkpoint: {where}: cannot store a {t.layout} / quantized tensor; make it dense first")
        if t.dtype not in _DTYPES:
            raise TypeError(f"checkpoint: {where}: safetensors cannot store dtype {t.dtype}")
        t = t.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        t = t.to("cpu").contiguous()  # a copy only where needed: the caller's tensor is never modified
        if t.numel() == 0:  # may point into another tensor's storage: give it none
            t = torch.empty(t.shape, dtype=t.dtype)
        else:
            if t.untyped_storage().data_ptr() in self._storages:  # shares storage with a tensor in this part
                t = t.clone()
            self._storages.add(t.untyped_storage().data_ptr())
        name = self._name(path)
        self.tensors[name] = t
        return {"tensor": name}

    def encode(self, obj: Any, path: list[str]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        kind = type(obj)
        if obj is None or kind in (bool, int, str):
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {"float": _float_bits(obj)}
        if kind in (dict, collections.OrderedDict):
            items = [[_encode_key(k, path), self.encode(v, path + [_path_component(k)])] for k, v in obj.items()]
            if kind is dict:
                return {"dict": items}
            node = {"odict": items}
            meta = getattr(obj, "_metadata", None)
            if meta is not None:  # nn.Module.state_dict()'s module versions
                packer = _Packer()
                node["metadata"] = packer.encode(meta, path + ["_metadata"])
                if packer.tensors:
                    raise TypeError(f"checkpoint: {'/'.join(path) or '<root>'}: _metadata holds tensors")
            return node
        if kind in (list, tuple):
            return {kind.__name__: [self.encode(v, path + [str(i)]) for i, v in enumerate(obj)]}
        where = "/".join(path) or "<root>"
        raise TypeError(f"checkpoint: {where}: cannot store a {kind.__module__}.{kind.__qualname__} "
                        "(tensors, dict/OrderedDict, list, tuple, None, bool, int, float, str only)")


def _path_component(key: Any) -> str:
    s = key if isinstance(key, str) else repr(key)
    return s.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates cannot go in a header


def _encode_key(key: Any, path: list[str]) -> Any:
    kind = type(key)
    if key is None or kind in (bool, int, str):
        return key
    if kind is float:
        return key if math.isfinite(key) else {"float": _float_bits(key)}
    if kind is tuple:
        return {"tuple": [_encode_key(k, path) for k in key]}
    raise TypeError(f"checkpoint: {'/'.join(path) or '<root>'}: cannot store a dict key of type "
                    f"{kind.__module__}.{kind.__qualname__} (None, bool, int, float, str or tuples of them)")


class _CorruptTree(Exception):
    pass


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """Inverse of ``_Packer.encode``: JSON scalars are leaves; a JSON object has one tag."""
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is not dict or not node:
        raise _CorruptTree(f"unexpected node {node!r:.80}")
    tag = next(iter(node))
    body = node[tag]
    if tag == "tensor" and len(node) == 1:
        if body not in tensors or body in used:
            raise _CorruptTree(f"tensor {body!r} missing or named twice")
        used.add(body)
        return tensors[body]
    if tag == "float" and len(node) == 1:
        return struct.unpack(">d", bytes.fromhex(body))[0]
    if tag in ("list", "tuple") and len(node) == 1 and type(body) is list:
        values = [_decode(v, tensors, used) for v in body]
        return values if tag == "list" else tuple(values)
    if tag in ("dict", "odict") and type(body) is list and set(node) <= {tag, "metadata"}:
        out = {} if tag == "dict" else collections.OrderedDict()
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise _CorruptTree(f"bad dict item {pair!r:.80}")
            out[_decode(pair[0], {}, set())] = _decode(pair[1], tensors, used)
        if "metadata" in node:
            if tag != "odict":
                raise _CorruptTree("metadata on a plain dict")
            out._metadata = _decode(node["metadata"], {}, set())
        return out
    raise _CorruptTree(f"unexpected node {node!r:.80}")


# -- the manager --------------------------------------------------------------------------------

def _check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError(f"checkpoint step must be an int >= 0, got {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"checkpoint step must be an int >= 0, got {step!r}") from None
    if step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step}")
    return step


def _check_part_name(name: Any) -> None:
    if not isinstance(name, str) or not _PART_RE.fullmatch(name):
        raise ValueError(f"checkpoint part name {name!r}: use letters, digits, '_', '.', '-' "
                         "(not first: '.', '-')")


def _index_crc(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "index_crc32c"}
    return f"{google_crc32c.value(json.dumps(body, sort_keys=True).encode()):08x}"


class CheckpointManager:
    """Saves, lists, prunes and loads ``<output_dir>/ckpt_<step>/`` checkpoints (module docstring).

    Args:
        output_dir: the directory holding the checkpoints and the ``checkpoint`` pointer file
            (created by the first ``save``).
        max_to_keep: how many checkpoints ``save`` keeps (it prunes the lowest steps, never the one
            it wrote); ``None`` or ``0``: keep all.
    """

    def __init__(self, output_dir: str | os.PathLike, max_to_keep: int | None = 5) -> None:
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 0):
            raise ValueError(f"max_to_keep must be None or an int >= 0, got {max_to_keep!r}")
        self.output_dir = pathlib.Path(output_dir)
        self.max_to_keep = max_to_keep

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.output_dir)!r}, max_to_keep={self.max_to_keep})"

    def _ckpt_dir(self, step: int) -> pathlib.Path:
        return self.output_dir / f"ckpt_{step}"

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, parts: dict[str, Any]) -> pathlib.Path:
        """Write ``parts`` ({part name: nested state}) as checkpoint ``step`` (module docstring:
        the protocol), make it the latest, prune; returns its directory ``ckpt_<step>``. Part
        names are file names: letters, digits, ``_``, ``.``, ``-``, not starting with ``.``/``-``.
        One writer only (rank 0). ``begin_save`` / ``write_part`` / ``finish_save`` are its
        steps, for several writers (``fxrec.distributed.checkpoint``)."""
        if not isinstance(parts, dict):
            raise TypeError(f"checkpoint parts must be a dict of part name -> state, got {type(parts).__name__}")
        for name in parts:
            _check_part_name(name)
        tmp = self.begin_save(step)
        try:
            files = {}
            for name, state in parts.items():
                files.update(self.write_part(tmp, name, state))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.finish_save(step, tmp, list(parts), files)

    def begin_save(self, step: int) -> pathlib.Path:
        """Protocol step 1: create ``output_dir`` if needed, clean up after crashed saves, create
        and return the temp dir ``.ckpt_<step>.tmp-<pid>`` that ``write_part`` writes into."""
        step = _check_step(step)
        if not self.output_dir.is_dir():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.output_dir.parent)
        self._clean_up()
        tmp = self.output_dir / f".ckpt_{step}.tmp-{os.getpid()}"
        tmp.mkdir()
        return tmp

    def write_part(self, tmp: pathlib.Path, name: str, state: Any) -> dict[str, dict]:
        """Write part ``name`` into the temp dir ``tmp`` (fsynced); returns its index entry
        ``{filename: {"crc32c", "bytes"}}``. Any process may write parts of one save (each its
        own names)."""
        _check_part_name(name)
        packer = _Packer()
        tree = packer.encode(state, [])
        path = pathlib.Path(tmp) / (name + PART_SUFFIX)
        metadata = {_FORMAT_KEY: FORMAT, _TREE_KEY: json.dumps(tree, allow_nan=False)}
        safetensors.torch.save_file(packer.tensors, path, metadata=metadata)
        del packer
        crc, size = _crc32c_of_file(path, fsync=True)
        _hook("file_written", path)
        return {path.name: {"crc32c": crc, "bytes": size}}

    def finish_save(self, step: int, tmp: pathlib.Path, parts: list[str], files: dict[str, dict]) -> pathlib.Path:
        """Protocol steps 2 (the index) to 6: ``tmp`` holds every part of ``parts``, whose files
        ``files`` describes (``write_part``'s entries); returns ``ckpt_<step>``. On an error the
        temp dir is removed and the previous checkpoint stays the latest."""
        step = _check_step(step)
        final = self._ckpt_dir(step)
        old = None
        try:
            missing = [p for p in parts if p + PART_SUFFIX not in files]
            if missing:
                raise ValueError(f"checkpoint {step}: parts {missing} were not written")
            index = {"format": FORMAT, "step": step, "parts": list(parts), "files": files}
            index["index_crc32c"] = _index_crc(index)
            with open(tmp / INDEX_NAME, "w") as f:
                json.dump(index, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _hook("file_written", tmp / INDEX_NAME)
            _fsync_dir(tmp)
            if final.exists():  # saving this step again: keep the complete copy until the new one is in
                old = self.output_dir / f".ckpt_{step}.old-{os.getpid()}"
                os.rename(final, old)
                _fsync_dir(self.output_dir)
                _hook("old_moved", old)
            os.rename(tmp, final)
            _fsync_dir(self.output_dir)
        except BaseException:
            if old is not None and not final.exists():
                os.rename(old, final)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _hook("dir_renamed", final)
        pointer = {"step": step, "dir": final.name}
        write_file_atomically(self.output_dir / POINTER_NAME, (json.dumps(pointer) + "\n").encode())
        _hook("pointer_written", self.output_dir / POINTER_NAME)
        if old is not None:
            _remove_dir(old)
        self._prune(step)
        return final

    def _clean_up(self) -> None:
        """Remove what crashed saves left (temp dirs and files, half-removed dirs); put back a
        checkpoint that a crash left under its ``.old`` name."""
        for entry in sorted(os.listdir(self.output_dir)):
            path = self.output_dir / entry
            if _TMP_RE.fullmatch(entry) or _DEL_RE.fullmatch(entry):
                shutil.rmtree(path, ignore_errors=True)
            elif _POINTER_TMP_RE.fullmatch(entry):
                path.unlink(missing_ok=True)
            elif m := _OLD_RE.fullmatch(entry):
                final = self._ckpt_dir(int(m.group(1)))
                if final.exists():
                    _remove_dir(path)
                else:
                    os.rename(path, final)
                    _fsync_dir(self.output_dir)

    def _prune(self, keep: int) -> None:
        if not self.max_to_keep:
            return
        others = [s for s in self._dir_steps() if s != keep]
        for s in others[:max(0, len(others) + 1 - self.max_to_keep)]:
            _remove_dir(self._ckpt_dir(s))

    # -- finding checkpoints --------------------------------------------------------------------

    def _dir_steps(self) -> list[int]:
        """Steps of the ``ckpt_<n>`` dirs holding an index, ascending."""
        try:
            entries = os.listdir(self.output_dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for e in entries
                      if (m := _CKPT_RE.fullmatch(e)) and (self.output_dir / e / INDEX_NAME).is_file())

    def _existing_dir(self, step: int) -> pathlib.Path | None:
        """``ckpt_<step>``, or, where a crash left it under its ``.old`` name, that; else None."""
        final = self._ckpt_dir(step)
        if final.is_dir():
            return final
        try:
            entries = sorted(os.listdir(self.output_dir))
        except FileNotFoundError:
            return None
        for e in entries:
            m = _OLD_RE.fullmatch(e)
            if m and int(m.group(1)) == step and (self.output_dir / e / INDEX_NAME).is_file():
                return self.output_dir / e
        return None

    def list_steps(self) -> list[int]:
        """The steps of the complete checkpoints on disk, ascending (including one a crash left
        under its ``.old`` name, which ``load`` reads)."""
        steps = set(self._dir_steps())
        try:
            entries = os.listdir(self.output_dir)
        except FileNotFoundError:
            entries = []
        for e in entries:
            if (m := _OLD_RE.fullmatch(e)) and (self.output_dir / e / INDEX_NAME).is_file():
                steps.add(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step the pointer file names (the last completed ``save``); None without one."""
        path = self.output_dir / POINTER_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            pointer = json.loads(text)
            step = pointer["step"]
            if type(step) is not int or step < 0 or pointer.get("dir") != f"ckpt_{step}":
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"checkpoint pointer file {path} is corrupt: {text[:200]!r}") from None
        return step

    # -- loading --------------------------------------------------------------------------------

    def _read_index(self, ckpt: pathlib.Path, step: int) -> dict:
        path = ckpt / INDEX_NAME
        try:
            index = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ValueError(f"checkpoint {ckpt}: {path} is missing") from None
        except ValueError as e:
            raise ValueError(f"checkpoint {ckpt}: {path} is corrupt (not JSON: {e})") from None
        ok = (isinstance(index, dict) and index.get("format") == FORMAT
              and isinstance(index.get("files"), dict) and isinstance(index.get("parts"), list)
              and index.get("index_crc32c") == _index_crc(index))
        if ok:
            files, parts = index["files"], index["parts"]
            ok = (type(index.get("step")) is int and index["step"] == step and len(set(parts)) == len(parts)
                  and all(isinstance(p, str) and _PART_RE.fullmatch(p) and p + PART_SUFFIX in files for p in parts)
                  and all(isinstance(f, str) and "/" not in f and "\\" not in f and f not in ("", ".", "..")
                          and isinstance(v, dict) and isinstance(v.get("crc32c"), str)
                          and type(v.get("bytes")) is int for f, v in files.items()))
        if not ok:
            raise ValueError(f"checkpoint {ckpt}: {path} is corrupt (fails its checks)")
        return index

    def _find(self, step: int | None) -> tuple[pathlib.Path, dict]:
        """(directory, checked index) of checkpoint ``step`` (None: the latest, per the pointer file)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.output_dir} (no '{POINTER_NAME}' pointer file)")
        step = _check_step(step)
        ckpt = self._existing_dir(step)
        if ckpt is None:
            raise FileNotFoundError(f"checkpoint {self._ckpt_dir(step)} does not exist "
                                    f"(steps in {self.output_dir}: {self.list_steps()})")
        return ckpt, self._read_index(ckpt, step)

    def part_names(self, step: int | None = None) -> list[str]:
        """The parts of checkpoint ``step`` (None: the latest), in saved order, from its index."""
        return list(self._find(step)[1]["parts"])

    def load(self, step: int | None = None, parts: Iterable[str] | None = None,
             map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Checkpoint ``step`` (None: the latest, per the pointer file) as {part name: state}:
        ``parts`` (default: all, in saved order), tensors on ``map_location``. Verifies every
        file of the checkpoint (size and crc32c against ``index.json``) before decoding any: a
        mismatch, a missing file or a corrupt index is a ``ValueError`` naming the file. No
        checkpoint: ``FileNotFoundError``; an unknown part: ``KeyError``."""
        device = torch.device(map_location)
        ckpt, index = self._find(step)
        wanted = list(index["parts"]) if parts is None else list(parts)
        unknown = [p for p in wanted if p not in index["parts"]]
        if unknown:
            raise KeyError(f"checkpoint {ckpt} has no part(s) {unknown}; it has {index['parts']}")
        for filename, expected in index["files"].items():
            path = ckpt / filename
            try:
                crc, size = _crc32c_of_file(path)
            except FileNotFoundError:
                raise ValueError(f"checkpoint {ckpt}: {path} is missing") from None
            if size != expected["bytes"]:
                raise ValueError(f"checkpoint {ckpt}: {path} has {size} bytes, index.json says {expected['bytes']}")
            if crc != expected["crc32c"]:
                raise ValueError(f"checkpoint {ckpt}: {path} fails its checksum "
                                 f"(crc32c {crc}, index.json says {expected['crc32c']})")
        out = {}
        for name in wanted:
            path = ckpt / (name + PART_SUFFIX)
            try:  # read on the CPU: errors here are the file's, a device's come below
                with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                    metadata = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                if metadata.get(_FORMAT_KEY) != FORMAT:
                    raise _CorruptTree(f"format {metadata.get(_FORMAT_KEY)!r}")
                tree = json.loads(metadata[_TREE_KEY])
            except (_CorruptTree, KeyError, ValueError, safetensors.SafetensorError) as e:
                raise ValueError(f"checkpoint {ckpt}: {path} is corrupt ({e})") from None
            if device.type != "cpu":
                tensors = {k: t.to(device) for k, t in tensors.items()}
            try:
                used: set[str] = set()
                out[name] = _decode(tree, tensors, used)
                if used != set(tensors):
                    raise _CorruptTree(f"unreferenced tensors {sorted(set(tensors) - used)[:5]}")
            except (_CorruptTree, KeyError, ValueError, TypeError, AttributeError, struct.error) as e:
                raise ValueError(f"checkpoint {ckpt}: {path} is corrupt ({e})") from None
        return out
