"""Compiles and loads fxrec's C sources as shared libraries called through ``ctypes``.

No build step at install and no Python headers: a source is compiled on first use with the
system C compiler (``$CC``, else ``cc``) into ``$FXREC_CACHE_DIR`` (default ``~/.cache/fxrec``),
under a name hashed from the source, the compiler and its flags, so an edited source or another
compiler gets its own library. The library is written to a temporary file and renamed into place:
processes compiling at once (DataLoader workers, torchrun ranks) never load a half-written file.
Triton builds its GPU launchers the same way, so this needs no compiler a Triton user lacks.

``ctypes.CDLL`` functions release the GIL while they run: threads calling them run in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["NativeUnavailable", "load_library"]

_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
_lock = threading.Lock()
_loaded: dict[tuple[Path, str], ctypes.CDLL] = {}


class NativeUnavailable(RuntimeError):
    """The C source could not be compiled or loaded on this machine (no compiler, a failed build)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("FXREC_CACHE_DIR") or Path.home() / ".cache" / "fxrec")


def _compile(source: Path, compiler: str) -> Path:
    command = shlex.split(compiler)
    if not command or shutil.which(command[0]) is None:
        raise NativeUnavailable(f"no C compiler {compiler!r} on PATH to build {source.name} (set $CC)")
    key = hashlib.sha256(source.read_bytes() + repr((compiler, _FLAGS)).encode()).hexdigest()[:16]
    cache = _cache_dir()
    library = cache / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, prefix=library.name, suffix=".partial")
    os.close(fd)
    try:
        build = subprocess.run([*command, *_FLAGS, str(source), "-o", partial], capture_output=True, text=True)
        if build.returncode != 0:
            raise NativeUnavailable(f"{compiler} failed to build {source}:\n{build.stderr.strip()}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def load_library(source: Path) -> ctypes.CDLL:
    """The shared library built from the C file ``source`` (built once per machine, loaded once per
    process). Raises NativeUnavailable when it can't be built or loaded."""
    compiler = os.environ.get("CC") or "cc"
    with _lock:
        key = (source, compiler)
        if key not in _loaded:
            try:
                _loaded[key] = ctypes.CDLL(str(_compile(source, compiler)))
            except OSError as error:
                raise NativeUnavailable(f"can't build or load {source.name}: {error}") from error
        return _loaded[key]
