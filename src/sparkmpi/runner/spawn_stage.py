"""Spawned processes on executors: ``MPI_Comm_spawn``'s children as tasks of a Spark stage.

When the cluster has free task slots for every process a rank spawns (or
``spark.sparkmpi.spawn.placement=executors``), the driver runs them as a stage of their own,
one task per process, instead of beside the parent rank (:mod:`sparkmpi.runner.spawned`).
Each task admits its process to the spawned PMI job, starts it and watches it as the barrier
tasks watch ranks; the spawn is answered once every process has started. A failing child
fails the parent job and the other way round (:class:`~sparkmpi.runner.hub.DriverHub`).
"""

from __future__ import annotations

import pickle
import selectors
import socket
import threading
from dataclasses import replace
from functools import partial
from typing import Any

from sparkmpi.runner.frames import Kind, decode, recv_parts, send
from sparkmpi.runner.hub import DriverHub, JobState, OutputSink
from sparkmpi.runner.launcher import (
    HANDSHAKE_TIMEOUT_S,
    RankAborted,
    RankFailed,
    TaskSpec,
    connect_control,
)
from sparkmpi.runner.runtime import get_runtime
from sparkmpi.runner.spawned import SpawnedProcesses, SpawnRefused

PLACEMENTS = ("auto", "executors", "beside")
_reserved = 0
_reserved_lock = threading.Lock()


def check_placement(placement: str | None) -> str:
    """``placement`` (default ``auto``) if it is one of :data:`PLACEMENTS`; ValueError naming
    them otherwise."""
    placement = placement or "auto"
    if placement not in PLACEMENTS:
        choices = ", ".join(PLACEMENTS)
        raise ValueError(f"spark.sparkmpi.spawn.placement={placement!r}: one of {choices}")
    return placement


def free_slots(sc, held: int = 0) -> int:
    """Task slots of the cluster that no running task holds now. Spark's status tracker can
    lag behind the tasks that run (it learns of them through its listener bus), so at least
    ``held`` slots (those our own running jobs are known to hold) count as busy."""
    from sparkmpi.runner.barrier import task_slots

    tracker = sc.statusTracker()
    busy = 0
    for stage in tracker.getActiveStageIds():
        info = tracker.getStageInfo(stage)
        busy += info.numActiveTasks if info else 0
    return task_slots(sc) - max(busy, held)


class ExecutorSpawner:
    """The driver's side: decides where a spawn runs and runs the stage when on executors."""

    def __init__(self, sc, hub: DriverHub, spec: TaskSpec, placement: str = "auto"):
        self.sc, self.hub, self.spec, self.placement = sc, hub, spec, placement

    def wants(self, size: int) -> bool:
        """Whether ``size`` new processes go to executors (else beside their parent). In
        ``auto`` a yes reserves the slots until the stage's tasks run (:meth:`launch`), so
        two spawns at once never count the same free slots."""
        global _reserved
        if self.placement != "auto":
            return self.placement == "executors"
        held = sum(job.size for job in list(self.hub.jobs.values()) if job.parent is None)
        with _reserved_lock:
            try:
                free = free_slots(self.sc, held) - _reserved
            except Exception:  # a stopping context: start them beside the parent
                return False
            if free < size:
                return False
            _reserved += size
            return True

    def release(self, size: int) -> None:
        """Gives back slots a yes of :meth:`wants` reserved (the tasks now run, or never will)."""
        global _reserved
        if self.placement == "auto":
            with _reserved_lock:
                _reserved -= size

    def launch(self, parent: JobState, rank: int, child, frame: dict, answer) -> None:
        """Runs the stage for ``child`` (a spawned PMI job) on a thread of its own; ``answer``
        gets None once every process started, else why they did not."""
        sink = _child_output(parent.output, rank)
        state = self.hub.create_job(child.size, sink, pmi_job=child)
        state.parent = (parent, rank)
        parent.children.append(state)
        spec = replace(
            self.spec,
            job_id=child.job_id,
            secret=child.secret,
            size=child.size,
            mode="spawned",
            job=pickle.dumps(frame),
            prestart=False,
        )
        thread = threading.Thread(
            target=self._run, args=(state, spec, answer), name="sparkmpi-spawn", daemon=True
        )
        thread.start()

    def _run(self, state: JobState, spec: TaskSpec, answer) -> None:
        answered = threading.Lock()

        def answer_once(error: str | None) -> None:
            if answered.acquire(blocking=False):
                answer(error)

        def started() -> None:
            state.all_ready.wait()
            self.release(spec.size)
            if state.closed and len(state.ready) < state.size:  # parent over, tasks unstarted
                self.sc.cancelJobGroup(group)
            reason = state.failures[0].get("reason") if state.failures else "they failed"
            answer_once(reason if state.failed.is_set() else None)

        group = f"sparkmpi-{state.job_id}"
        threading.Thread(target=started, daemon=True).start()
        self.sc.setJobGroup(group, f"processes spawned for MPI job {state.job_id}", True)
        try:
            rdd = self.sc.parallelize(range(spec.size), spec.size)
            rdd.mapPartitions(partial(spawned_task, spec)).count()
        except Exception as exc:
            from sparkmpi.runner.barrier import spark_error_summary

            reason = f"the spawned processes' Spark stage failed: {spark_error_summary(exc)}"
            answer_once(reason)
            self.hub.fail(state, {"rank": None, "reason": reason})


def _child_output(parent_output: OutputSink | None, rank: int) -> OutputSink | None:
    if parent_output is None:
        return None
    return lambda _child, stream, text: parent_output(rank, stream, text)


def spawned_task(spec: TaskSpec, rows) -> list:
    """mapPartitions body: starts process ``partitionId`` of a spawned job and watches it."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    rank = ctx.partitionId()
    if ctx.attemptNumber() > 0:
        raise RankFailed(f"spawned process {rank} of job {spec.job_id} is not retried")
    host = socket.gethostname()
    control = connect_control(spec, rank, host)
    lock = threading.Lock()

    def to_driver(kind: Kind, obj: Any = None) -> None:
        with lock:
            send(control, kind, obj)

    env = {**get_runtime(spec.runtime).rank_env(), **spec.env}
    sel = selectors.DefaultSelector()
    relay = lambda stream, text: to_driver(Kind.OUTPUT, (stream, text))  # noqa: E731
    children = SpawnedProcesses(env, relay, sel)
    try:
        try:
            children.start(pickle.loads(spec.job), spec.pmi, HANDSHAKE_TIMEOUT_S, only=rank)
        except SpawnRefused as exc:
            to_driver(Kind.ERROR, {"rank": rank, "host": host, "reason": str(exc)})
            raise RankFailed(f"spawned process {rank} on {host}: {exc}") from None
        to_driver(Kind.READY)
        sel.register(control, selectors.EVENT_READ, "control")
        while children.children:
            for key, _ in sel.select():
                if key.data == "control":
                    _from_driver(control, rank)
                    continue
                failure = children.on_event(*key.data)
                if failure is not None:
                    to_driver(Kind.ERROR, {"rank": rank, "host": host, **failure})
                    raise RankFailed(f"spawned process {rank} on {host}: {failure['reason']}")
        to_driver(Kind.FINISHED)
        return []
    finally:
        children.close()
        sel.close()
        control.close()


def _from_driver(control: socket.socket, rank: int) -> None:
    try:
        kind, parts = recv_parts(control)
    except (EOFError, OSError):
        raise RankAborted(f"spawned process {rank}: lost the connection to the driver") from None
    if kind is Kind.ABORT:
        raise RankAborted(f"spawned process {rank} killed: {decode(parts)}")


__all__ = ["PLACEMENTS", "ExecutorSpawner", "check_placement", "free_slots", "spawned_task"]
