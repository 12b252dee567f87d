"""``MPISession``: ranks that stay alive across many submissions (streaming micro-batches)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

from sparkmpi.runner.barrier import BarrierJob, hold_slots, spark_context
from sparkmpi.runner.errors import MPIJobError
from sparkmpi.runner.frames import Kind, encode
from sparkmpi.runner.functions import dumps_function
from sparkmpi.runner.hub import OutputSink, print_prefixed


class MPISession:
    """``ranks`` MPI processes that keep ``MPI.COMM_WORLD`` alive between calls to :meth:`run`.

    The ranks are a barrier stage that holds ``ranks`` task slots until :meth:`close` (or the
    end of a ``with`` block), which ends every rank process. A failing submission fails the
    session: its ranks are stopped and :class:`MPIJobError` names the rank.
    """

    def __init__(
        self,
        spark,
        ranks: int,
        *,
        runtime: str = "mpich",
        env: dict[str, str] | None = None,
        output: OutputSink | None = print_prefixed,
        pmi_host: str | None = None,
        start_timeout: float = 120.0,
    ):
        if not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        rdd = spark_context(spark).parallelize([], ranks)
        self.ranks = ranks
        self._released = False
        self._release_lock = threading.Lock()
        self._job = BarrierJob(
            rdd,
            "session",
            {"mode": "session"},
            runtime=runtime,
            env=env,
            output=output,
            pmi_host=pmi_host,
        )
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name="sparkmpi-session", daemon=True)
        hold_slots(ranks)
        self._thread.start()
        try:
            self._wait_for(self._job.state.all_ready, start_timeout, "start")
        except BaseException:
            self.close()
            raise

    def _hold(self) -> None:
        try:
            self._job.run(lambda rdd: rdd.collect())
        except BaseException as exc:
            self._error = exc
        finally:
            self._release()

    def _wait_for(self, event: threading.Event, timeout: float | None, what: str) -> None:
        state = self._job.state
        deadline = None if timeout is None else time.monotonic() + timeout
        while not event.wait(0.01) and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                reason = f"{what} timed out after {timeout} s"
                self._job.hub.fail(state, {"rank": None, "reason": reason})
                deadline = None
        if state.failed.is_set() or not self._thread.is_alive():
            self._closed = True
            self._thread.join()
            if isinstance(self._error, MPIJobError):
                raise self._error
            raise MPIJobError(f"MPI session ended during {what}") from self._error

    def run(self, fn: Callable, data: Sequence | None = None, timeout: float | None = None) -> list:
        """What ``fn(comm, data[r])`` returned on each rank ``r``, in rank order."""
        if data is not None and len(data) != self.ranks:
            raise ValueError(f"data has {len(data)} entries for {self.ranks} ranks")
        with self._lock:
            if self._closed:
                raise MPIJobError("this MPI session is closed")
            seq, fn_bytes = next(self._seq), dumps_function(fn)
            payloads = [
                encode((seq, fn_bytes, None if data is None else data[r]))
                for r in range(self.ranks)
            ]
            state = self._job.state
            self._job.hub.broadcast(state, Kind.CALL, payloads)
            self._wait_for(state.results_done, timeout, "a submission")
            return [state.results[r] for r in range(self.ranks)]

    def close(self, timeout: float = 30.0) -> None:
        """Ends every rank process and releases the task slots (idempotent)."""
        with self._lock:
            self._closed = True
            state = self._job.state
            if self._thread.is_alive() and not state.failed.is_set():
                self._job.hub.broadcast(state, Kind.END, None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._job.hub.fail(state, {"rank": None, "reason": "session close timed out"})
                self._thread.join()

    def _release(self) -> None:
        with self._release_lock:
            if not self._released:
                self._released = True
                hold_slots(-self.ranks)

    def __enter__(self) -> MPISession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
