"""Verification over the machine's cores: worker processes that each take whole batches.

The command's own process reads the inputs (one pass over the data) and hands batches to workers as they
become free, running batches itself in between; every process runs every executor on its batch, single-
threaded (one intra-op thread in torch, onnxruntime and the engine: on a shared machine a spinning
thread pool costs more than it gives, and the processes are the parallelism). A batch is the same
samples whichever process runs it, and the per-batch tallies are merged in batch order, so the result
is the one a single process gives -- counts, first divergence and all.

Workers are fresh interpreters (forking a process whose torch and onnxruntime thread pools run is not
safe; multiprocessing's spawn would run the caller's main script again) and get the quantized graph, the
files exported for the run and the settings once; each opens its own models and sessions. Messages are
plain pickles (multiprocessing's own pickler would hand torch tensors over as shared memory, which
needs the sender's authentication key). A worker's DeployError (or MismatchError) is raised again in the
command's process as it is; a worker that dies (killed for memory, for instance) is one clear error.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional

from sdt_deploy.errors import DeployError


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_single_thread(enabled: bool = True):
    """This process's torch intra-op threads set to one for the run, restored after."""
    if not enabled:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_main(fd: int) -> None:
    """A worker (`python -c` started by `Workers`): its connection is the inherited socket `fd`; the
    first message is the parent's sys.path, the second the context to build; then batches to compare."""
    conn = Connection(fd)
    try:
        sys.path[:] = recv(conn)
        import torch

        torch.set_num_threads(1)
        from sdt_deploy.verification.executors import Context
        from sdt_deploy.verification.verifier import Tally, compare_batch

        setup = recv(conn)
        if setup["keep_heap"]:
            from sdt_deploy.heap import keep_large_blocks_in_heap

            keep_large_blocks_in_heap()
        ctx = Context(setup["q"], setup["workdir"], dict(setup["artifacts"]), set(setup["user_files"]),
                      float64_reference=setup["float64_reference"], states=set(setup["states"]), threads=1,
                      trim_above=setup["trim_above"])
        send(conn, ("ready", None, None))
    except EOFError:
        return
    except BaseException as exc:      # noqa: BLE001 - reported to the parent, which raises it
        send(conn, ("crash", None, "".join(traceback.format_exception(exc))))
        return
    while True:
        try:
            msg = recv(conn)
        except EOFError:
            return
        if msg[0] == "stop":
            return
        _, i, x, labels, offset = msg
        try:
            tally = Tally()
            compare_batch(ctx, x, labels, setup["active"], offset, tally, setup["reference"])
            send(conn, ("done", i, tally))
        except DeployError as exc:
            send(conn, ("error", i, exc))
        except BaseException as exc:  # noqa: BLE001
            send(conn, ("crash", i, "".join(traceback.format_exception(exc))))


def send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn):
    return pickle.loads(conn.recv_bytes())


_WORKER = "from sdt_deploy.verification.parallel import _worker_main; _worker_main({fd})"
_SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class Workers:
    """`n` worker processes for `run_batches`, each a fresh interpreter (`python -c`, so nothing of the
    caller's main script runs again, as it would under multiprocessing's spawn) talking over a socket
    pair; stopped and reaped on leaving the `with` block."""

    def __init__(self, n: int, setup: dict):
        self.setup, self.procs, self.conns, self.ready = setup, [], [], set()
        try:
            for _ in range(max(0, n)):
                mine, theirs = socket.socketpair()
                fd = theirs.fileno()
                proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(fd=fd)], pass_fds=(fd,),
                                        env={**os.environ, **_SINGLE_THREAD}, stdin=subprocess.DEVNULL)
                theirs.close()
                self.procs.append(proc)
                self.conns.append(Connection(mine.detach()))
            for c in self.conns:
                send(c, list(sys.path))
                send(c, setup)
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, ValueError):
                send(c, ("stop",))
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.conns:
            c.close()


def _receive(conn, proc):
    try:
        return recv(conn)
    except (EOFError, OSError):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        raise DeployError(f"verify: a worker process ended unexpectedly (exit code {proc.returncode}; killed "
                          "for memory? try a smaller --max-memory, or --jobs 1)") from None


def run_batches(chunks: list, load: Callable[[list], tuple], local: Callable[[object, object, int], object],
                workers: Optional[Workers], advance: Callable[[int], None]) -> list:
    """The tally of every chunk of sample indices, in chunk order: `local(x, labels, offset)` runs a batch in
    this process; the workers (when any) take batches as soon as they are ready and free."""
    results: list = [None] * len(chunks)
    next_chunk = 0
    busy: dict = {}                                  # worker index -> chunk index
    conns = workers.conns if workers else []

    def handle(w: int) -> None:
        kind, i, payload = _receive(conns[w], workers.procs[w])
        if kind == "crash":
            raise RuntimeError(f"verify worker failed:\n{payload}")
        if kind == "error":
            raise payload
        if kind == "ready":
            workers.ready.add(w)
            return
        results[i] = payload
        del busy[w]
        advance(len(chunks[i]))

    def feed() -> None:
        nonlocal next_chunk
        for w in sorted(workers.ready if workers else ()):
            if w not in busy and next_chunk < len(chunks):
                chunk = chunks[next_chunk]
                x, labels = load(chunk)
                send(conns[w], ("batch", next_chunk, x, labels, chunk[0]))
                busy[w] = next_chunk
                next_chunk += 1

    while next_chunk < len(chunks) or busy:
        for conn in wait(conns, timeout=0) if conns else ():
            handle(conns.index(conn))
        feed()
        if next_chunk < len(chunks):
            i = next_chunk
            next_chunk += 1
            x, labels = load(chunks[i])
            results[i] = local(x, labels, chunks[i][0])
            advance(len(chunks[i]))
        elif busy:
            for conn in wait([conns[w] for w in busy]):
                handle(conns.index(conn))
    return results
