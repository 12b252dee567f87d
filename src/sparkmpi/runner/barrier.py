"""The driver's side of one MPI job: a Spark barrier stage whose tasks are the ranks."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from functools import partial

from sparkmpi.pmi import ListenerLimits
from sparkmpi.runner.addresses import listen_address
from sparkmpi.runner.errors import (
    InsufficientSlotsError,
    MPIJobError,
    UnschedulableResourcesError,
    error_from_reports,
)
from sparkmpi.runner.frames import encode
from sparkmpi.runner.hub import DriverHub, JobState, OutputSink, get_hub, print_prefixed
from sparkmpi.runner.launcher import TaskSpec, barrier_task
from sparkmpi.runner.resources import local_mode_resources
from sparkmpi.runner.runtime import get_runtime
from sparkmpi.runner.spawn_stage import ExecutorSpawner, check_placement

KILL_GRACE_S = 5.0
"""How long a failed job waits for its tasks to confirm their ranks are dead."""
SLOT_WAIT_S = 60.0
"""How long a non-local cluster may take to offer enough task slots (executors starting)."""

_held_slots = 0
_held_lock = threading.Lock()


def spark_context(data):
    """The SparkContext behind a SparkSession, SparkContext, RDD or DataFrame."""
    for attr in ("sparkContext", "context"):
        sc = getattr(data, attr, None)
        if sc is not None:
            return sc() if callable(sc) else sc
    if hasattr(data, "_jsc"):
        return data
    if hasattr(data, "rdd"):
        return data.rdd.context
    raise TypeError(f"expected a SparkSession, SparkContext, RDD or DataFrame, not {type(data)}")


def task_slots(sc) -> int:
    """How many tasks the cluster can run at once (what Spark's barrier check counts)."""
    jsc = sc._jsc.sc()
    try:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:
        return int(sc.defaultParallelism)


def hold_slots(count: int) -> None:
    """Marks ``count`` slots as taken by a persistent session (negative releases them)."""
    global _held_slots
    with _held_lock:
        _held_slots += count


def ensure_slots(sc, ranks: int, wait: float | None = None) -> None:
    """Returns once ``ranks`` task slots are free; :class:`InsufficientSlotsError` otherwise.

    Spark's own check would retry for minutes before failing; this one fails at once in local
    mode and after ``wait`` seconds (executors still registering) on a cluster, including
    ``local-cluster[...]``.
    """
    local = sc.master == "local" or sc.master.startswith("local[")  # local-cluster[...] waits
    wait = 0.0 if local else (SLOT_WAIT_S if wait is None else wait)
    deadline = time.monotonic() + wait
    while True:
        total = task_slots(sc)
        free = total - _held_slots
        if free >= ranks:
            return
        if time.monotonic() >= deadline:
            held = f", {_held_slots} of them held by open MPI sessions" if _held_slots else ""
            raise InsufficientSlotsError(
                f"{ranks} MPI ranks need {ranks} free Spark task slots, but {sc.master} has "
                f"{total}{held}; use fewer ranks or give Spark more cores "
                f"(e.g. local[{ranks}])"
            )
        time.sleep(0.5)


def _setting(conf, name: str) -> str | None:
    """``spark.sparkmpi.<name>`` from the Spark conf, else ``SPARKMPI_<NAME>`` from the env."""
    return conf.get(f"spark.sparkmpi.{name}") or os.environ.get(
        "SPARKMPI_" + name.upper().replace(".", "_")
    )


def _seconds(conf, name: str, default: float) -> float:
    value = _setting(conf, name)
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise ValueError(f"spark.sparkmpi.{name}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"spark.sparkmpi.{name} must be positive, got {value!r}")
    return seconds


def listener_limits(conf) -> ListenerLimits:
    """The driver listeners' limits from ``spark.sparkmpi.link.timeout`` (seconds a silent peer
    keeps its connection, default 5) and ``spark.sparkmpi.auth.timeout`` (seconds to
    authenticate, default 5), or ``SPARKMPI_LINK_TIMEOUT`` / ``SPARKMPI_AUTH_TIMEOUT``."""
    defaults = ListenerLimits()
    return ListenerLimits(
        auth_deadline=_seconds(conf, "auth.timeout", defaults.auth_deadline),
        link_timeout=_seconds(conf, "link.timeout", defaults.link_timeout),
    )


def hub_for(sc, pmi_host: str | None = None) -> DriverHub:
    """The driver's hub, bound where this context's executors can reach it
    (:mod:`sparkmpi.runner.addresses` has the rule; ``pmi_host`` overrides it).

    Ports (default: any free one): ``spark.sparkmpi.pmi.port`` / ``SPARKMPI_PMI_PORT`` and
    ``spark.sparkmpi.control.port`` / ``SPARKMPI_CONTROL_PORT``.
    """
    conf = sc.getConf()
    address = listen_address(sc.master, conf.get, pmi_host or _setting(conf, "pmi.host"))
    pmi_port = int(_setting(conf, "pmi.port") or 0)
    control_port = int(_setting(conf, "control.port") or 0)
    limits = listener_limits(conf)
    try:
        return get_hub(address.bind, pmi_port, control_port, address.advertise, limits)
    except OSError as exc:
        raise MPIJobError(
            f"cannot listen for MPI ranks on {address.bind} (chosen by: {address.rule}): "
            f"{exc.strerror or exc}"
        ) from None


_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w+(?:Error|Exception|Failed|Aborted): .+")
_RANK_FAILED = re.compile(r"RankFailed: MPI rank (\d+) on (\S+) failed: (.+)")


def spark_error_summary(error: BaseException) -> str:
    """The most telling line of a (Py4J-wrapped) Spark failure."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    python_lines = [ln.strip() for ln in lines if _EXCEPTION_LINE.match(ln)]
    for line in python_lines:
        if not line.startswith(("py4j.", "org.apache.spark.api.python.PythonException")):
            return line
    return lines[0].strip() if lines else repr(error)


class BarrierJob:
    """One MPI job as a barrier stage, its Spark action running on a background thread.

    Construction submits nothing: a job that cannot be scheduled raises here
    (:class:`UnschedulableResourcesError`, :class:`InsufficientSlotsError`)."""

    def __init__(
        self,
        rdd,
        mode: str,
        body: dict,
        *,
        runtime: str = "mpich",
        env: dict[str, str] | None = None,
        output: OutputSink | None = print_prefixed,
        pmi_host: str | None = None,
        slot_wait: float | None = None,
    ):
        self.sc = rdd.context
        get_runtime(runtime)
        unschedulable = local_mode_resources(self.sc.master, dict(self.sc.getConf().getAll()))
        if unschedulable:
            raise UnschedulableResourcesError(unschedulable)
        self.size = rdd.getNumPartitions()
        ensure_slots(self.sc, self.size, slot_wait)
        placement = check_placement(_setting(self.sc.getConf(), "spawn.placement"))
        self.hub = hub_for(self.sc, pmi_host)
        self.state: JobState = self.hub.create_job(self.size, output)
        spec = TaskSpec(
            job_id=self.state.job_id,
            secret=self.state.secret,
            size=self.size,
            hub=self.hub.address,
            pmi=self.hub.pmi.address,
            mode=mode,
            job=bytes(encode(body).data),
            runtime=runtime,
            env=dict(env or {}),
            prestart=os.environ.get("SPARKMPI_PRESTART", "1") != "0",
            link_timeout=self.hub.limits.link_timeout,
        )
        self.state.spawner = ExecutorSpawner(self.sc, self.hub, spec, placement)
        self.rdd = rdd.barrier().mapPartitions(partial(barrier_task, spec))
        self.group = f"sparkmpi-{self.state.job_id}"

    def run(self, action, timeout: float | None = None):
        """``action(rdd)`` (a Spark action) run to completion in this thread, in its own job group.

        A watcher thread cancels the stage as soon as any rank fails or ``timeout`` passes;
        then the tasks kill their ranks and :class:`MPIJobError` is raised here.
        """
        sc, state = self.sc, self.state
        keys = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")
        previous = {key: sc.getLocalProperty(key) for key in keys}
        sc.setJobGroup(self.group, f"MPI job {state.job_id} ({self.size} ranks)", True)
        finished = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(finished, timeout), daemon=True)
        watcher.start()
        error: BaseException | None = None
        try:
            value = action(self.rdd)
        except Exception as exc:
            error = exc
        except BaseException:  # KeyboardInterrupt & co.: stop the ranks, then let it through
            self.hub.fail(state, {"rank": None, "reason": "interrupted on the driver"})
            with contextlib.suppress(Exception):  # py4j may be mid-call in this very thread
                sc.cancelJobGroup(self.group)
            raise
        finally:
            finished.set()
            state.changed.set()
            watcher.join()
            for key, old in previous.items():
                sc.setLocalProperty(key, old)
        if state.failed.is_set() or (error is not None and state.failed.wait(1.0)):
            self._raise_failure()
        self.close()
        if error is not None:
            raise self._spark_failure(error) from error
        return value

    def _spark_failure(self, error: BaseException) -> MPIJobError:
        """The MPIJobError for a job that Spark failed before any rank could tell the driver
        (e.g. a task that cannot reach the driver): named after the rank when a task said which."""
        summary = spark_error_summary(error)
        match = _RANK_FAILED.search(summary)
        if match is None:
            return MPIJobError(f"Spark failed to run MPI job {self.state.job_id}: {summary}")
        rank, host, reason = int(match.group(1)), match.group(2), match.group(3)
        report = {"rank": rank, "host": host, "reason": reason}
        return error_from_reports(self.state.job_id, self.size, [report])

    def _watch(self, finished: threading.Event, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not finished.is_set():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.state.changed.wait(left)
            if finished.is_set():
                return
            if self.state.failed.is_set():
                self.sc.cancelJobGroup(self.group)
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.hub.fail(self.state, {"rank": None, "reason": f"timed out after {timeout} s"})
                deadline = None

    def _raise_failure(self):
        deadline = time.monotonic() + KILL_GRACE_S
        states = [self.state, *self.state.children]  # the tasks of spawned processes too
        while any(s.links for s in states) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.close()
        raise error_from_reports(self.state.job_id, self.size, self.state.failures)

    def close(self) -> None:
        if not self.state.closed:
            self.hub.close_job(self.state)
