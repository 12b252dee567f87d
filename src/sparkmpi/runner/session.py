"""``MPISession``: ranks that stay alive across many submissions (streaming micro-batches)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

import cloudpickle

from sparkmpi.runner.barrier import BarrierJob, hold_slots, spark_context
from sparkmpi.runner.errors import MPIJobError
from sparkmpi.runner.frames import Kind, encode
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
        rdd = spark_context(spark).parallelize([], ranks)
        self.ranks = ranks
        self._job = BarrierJob(
            rdd, "session", {"mode": "session"},
            runtime=runtime, env=env, output=output, pmi_host=pmi_host,
        )
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        hold_slots(ranks)
        try:
            self._job.start(lambda rdd: rdd.collect())
            self._wait_for(self._job.state.all_ready, start_timeout, "start")
        except BaseException:
            self._release()
            raise

    def _wait_for(self, event: threading.Event, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not event.wait(0.01):
            if not self._job.running:
                self._release()
                self._job.wait()  # raises the Spark error
                raise MPIJobError(f"MPI session ended during {what}")
            if deadline is not None and time.monotonic() > deadline:
                self._job.hub.fail(
                    self._job.state, {"rank": None, "reason": f"{what} timed out after {timeout} s"}
                )
                event = self._job.state.failed
                deadline = None
        if self._job.state.failed.is_set():
            self._release()
            self._job.raise_failure()

    def run(self, fn: Callable, data: Sequence | None = None, timeout: float | None = None) -> list:
        """``[fn(comm, data[r]) on rank r for r in range(ranks)]`` (``data[r]`` is None if no data)."""
        if data is not None and len(data) != self.ranks:
            raise ValueError(f"data has {len(data)} entries for {self.ranks} ranks")
        with self._lock:
            if self._closed:
                raise MPIJobError("this MPI session is closed")
            seq, fn_bytes = next(self._seq), cloudpickle.dumps(fn)
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
            if self._closed:
                return
            self._closed = True
        try:
            if not self._job.state.failed.is_set():
                self._job.hub.broadcast(self._job.state, Kind.END, None)
                self._job.wait(timeout)
        finally:
            self._release()
            self._job.close()

    def _release(self) -> None:
        if not getattr(self, "_released", False):
            self._released = True
            self._closed = True
            hold_slots(-self.ranks)

    def __enter__(self) -> MPISession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
