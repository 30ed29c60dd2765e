"""``Logger(name)``: RecIS's logger (``recis.utils.logger.Logger``) on the standard ``logging``.

INFO and DEBUG go to stdout, WARNING and above to stderr, formatted
``[time] [LEVEL] [rank R] [name] message`` (the rank part only when ``RANK`` is set, read at each
record, so a logger made before ``torchrun``'s environment is read still shows it). The
``*_rank0`` methods log only where ``RANK`` is unset or 0. Handlers are attached once per name, and
the logger does not propagate to the root logger (no duplicate lines under ``basicConfig``).
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[%(asctime)s] [%(levelname)s] %(rank)s[%(name)s] %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        record.rank = f"[rank {rank}] " if rank is not None else ""
        return True


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Logger:
    """``Logger(name=__name__, level=logging.INFO)``: debug/info/warning/error/exception/critical,
    plus info_rank0/warning_rank0/error_rank0."""

    def __init__(self, name: str = "fxrec", level: int = logging.INFO):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not getattr(logger, "_fxrec_handlers", False):
            formatter = logging.Formatter(_FORMAT)
            out = logging.StreamHandler(sys.stdout)
            out.addFilter(lambda r: r.levelno < logging.WARNING)
            err = logging.StreamHandler(sys.stderr)
            err.setLevel(logging.WARNING)
            for handler in (out, err):
                handler.addFilter(_RankFilter())
                handler.setFormatter(formatter)
                logger.addHandler(handler)
            logger.propagate = False
            logger._fxrec_handlers = True
        self._logger = logger

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    def setLevel(self, level: int) -> None:
        self._logger.setLevel(level)

    def debug(self, *args, **kwargs):
        self._logger.debug(*args, **kwargs)

    def info(self, *args, **kwargs):
        self._logger.info(*args, **kwargs)

    def warning(self, *args, **kwargs):
        self._logger.warning(*args, **kwargs)

    def error(self, *args, **kwargs):
        self._logger.error(*args, **kwargs)

    def exception(self, *args, **kwargs):
        self._logger.exception(*args, **kwargs)

    def critical(self, *args, **kwargs):
        self._logger.critical(*args, **kwargs)

    def info_rank0(self, *args, **kwargs):
        if _is_rank0():
            self._logger.info(*args, **kwargs)

    def warning_rank0(self, *args, **kwargs):
        if _is_rank0():
            self._logger.warning(*args, **kwargs)

    def error_rank0(self, *args, **kwargs):
        if _is_rank0():
            self._logger.error(*args, **kwargs)
