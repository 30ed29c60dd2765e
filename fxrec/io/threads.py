"""Background threads that feed the consumer: ``ordered_parallel``.

pyarrow releases the GIL while it decodes (and numpy / torch while they copy), so plain threads
work in parallel. ``ordered_parallel(jobs, num_threads, max_ahead)`` runs jobs on a pool of
threads, each job pushing its items into its own bounded queue; the consumer drains the queues
in job order, so what it sees does not depend on the thread count or on timing. A thread that
finishes a job starts the next one at once (it does not wait for the consumer to reach the
finished job), so work never pauses while the consumer catches up.

The consumer never hangs: an exception in a thread travels through the queue and is re-raised
in the consumer (with its traceback), threads that die without saying so are reported as an
error, and closing the consumer's generator (``break``, garbage collection) stops the threads
and waits for them (every pool sharing the ``stop`` event). Threads are daemons, so a reader
that is never closed does not block interpreter exit.

Torch ops on these threads run on one core each: the threads themselves are the parallelism
(``_one_intra_op_thread``).
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

import torch

__all__ = ["ordered_parallel"]

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked thread checks that its consumer still wants it
_END = object()


class _Stopped(Exception):
    """Raised inside a producer thread when its consumer went away."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    return getattr(ctypes.CDLL(None), "omp_set_num_threads", None)  # torch loads its OpenMP globally


def _one_intra_op_thread() -> None:
    """Run the calling thread's torch ops on one core, leaving every other thread as it is.

    Each thread that runs a torch op over more than 32768 elements (hashing, casts, copies)
    starts its own OpenMP team of ``torch.get_num_threads()`` threads: N reader threads made
    N x cores threads that wait for one another at every op's barrier (read-time hashing stayed
    at ~20K rows/s on 16 cores whatever read_threads_num; on 2 busy cores one reader hashed
    0.5M strings/s instead of 20M). OpenMP's thread count belongs to the calling thread, but
    torch only has a setter for the whole process (it would also change threads started later,
    e.g. the trainer's), hence the runtime's own ``omp_set_num_threads``. ``get_num_threads``
    first: torch sets each thread's count on its first parallel op, which would undo ours.
    Without OpenMP (torch's native thread pool, shared by all threads) there is nothing to do.
    """
    set_num_threads = _omp_set_num_threads()
    if torch.get_num_threads() > 1 and set_num_threads is not None:
        set_num_threads(1)


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _run_job(job, q: queue.Queue, stop: threading.Event) -> None:
    """Run one job into its queue; whatever happens, the queue ends with _END or a _Failure."""
    try:
        job(lambda item: _put(q, item, stop))
        _put(q, _END, stop)
    except _Stopped:
        raise
    except BaseException as error:  # noqa: BLE001  (everything must reach the consumer)
        _put(q, _Failure(error), stop)


def _drain(q: queue.Queue, alive: Callable[[], bool]) -> Iterator:
    """The items of one job's queue up to its _END; re-raise its failure."""
    while True:
        try:
            item = q.get(timeout=_POLL_S)
        except queue.Empty:
            if not alive() and q.empty():
                raise RuntimeError("fxrec.io reader threads ended without a result or an error") from None
            continue
        if item is _END:
            return
        if isinstance(item, _Failure):
            raise item.error
        yield item


def ordered_parallel(
    jobs: Iterable[Callable[[Callable[[T], None]], None]],
    num_threads: int,
    max_ahead: int,
    queue_size: int = 2,
    stop: threading.Event | None = None,
) -> Iterator[T]:
    """Run ``job(put)`` for each job on ``num_threads`` threads; yield all items in job order.

    At most ``max_ahead`` jobs are started and not yet fully consumed (threads wait for the
    consumer beyond that), and each may hold ``queue_size`` items: memory stays bounded.
    ``jobs`` is advanced on the pool's threads, one at a time, so it may be a generator that
    itself does work (e.g. pulls from another ``ordered_parallel``); an error it raises reaches
    the consumer after the items of every job before it.

    ``stop``: an event owned by the caller, who sets it to stop the threads (pools that feed
    one another share one, so the outermost consumer can stop them all, even while an inner
    one is being advanced). Without it, the pool stops when this generator ends or is closed.
    """
    owned = stop is None
    stop = threading.Event() if owned else stop
    pending = iter(jobs)
    taking = threading.Lock()  # one thread advances `pending` at a time (it may block a while)
    lock = threading.Lock()  # guards `started` / `next_number`; never held while waiting on work
    announced = threading.Condition(lock)
    started: dict[int, queue.Queue] = {}  # job number -> its queue, until consumed
    slots = threading.Semaphore(max(max_ahead, num_threads))
    next_number = 0

    def take() -> tuple[Callable, queue.Queue] | None:
        nonlocal next_number
        with taking:
            try:
                job = next(pending, None)
            except BaseException as error:  # noqa: BLE001  (the job source failed: tell the consumer)
                job, failure = None, _Failure(error)
            else:
                failure = None
            if job is None and failure is None:
                return None
            with lock:
                q = started[next_number] = queue.Queue(queue_size)
                next_number += 1
                announced.notify_all()
            if failure is not None:
                q.put(failure)
                return None
            return job, q

    crashed: list[BaseException] = []
    running = num_threads  # workers not yet returned; counted (not is_alive) so that the
    # consumer is woken the moment the last one is done

    def worker() -> None:
        nonlocal running
        try:
            _one_intra_op_thread()
            while True:
                while not slots.acquire(timeout=_POLL_S):
                    if stop.is_set():
                        return
                taken = take()
                if taken is None:
                    return
                _run_job(taken[0], taken[1], stop)
        except _Stopped:
            pass
        except BaseException as error:  # noqa: BLE001  (a bug here must not end the stream quietly)
            crashed.append(error)
        finally:
            with lock:
                running -= 1
                announced.notify_all()

    alive = lambda: running > 0  # noqa: E731
    threads = [threading.Thread(target=worker, daemon=True, name="fxrec-io") for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    try:
        number = 0
        while True:
            with lock:
                while number not in started:
                    if next_number == number and not alive():
                        if crashed:
                            raise crashed[0]
                        return  # every job consumed and no thread left to start one
                    announced.wait(_POLL_S)
                q = started[number]
            yield from _drain(q, alive)
            with lock:
                del started[number]
            slots.release()
            number += 1
    except GeneratorExit:
        stop.set()  # the consumer went away: stop every pool that shares this event
        raise
    finally:
        if owned:
            stop.set()
        if stop.is_set():
            # Wait until the threads are out of pyarrow / torch code (they poll ``stop``): a daemon
            # thread still decoding when the interpreter exits aborts the process ("terminate
            # called without an active exception", seen at the end of torchrun jobs that stopped
            # mid-epoch).
            for thread in threads:
                thread.join()
