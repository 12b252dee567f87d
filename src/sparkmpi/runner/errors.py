"""Exceptions a caller of the runner sees."""

from __future__ import annotations


class MPIJobError(RuntimeError):
    """An MPI job failed; ``rank`` names the first rank that failed (None if none did)."""

    def __init__(self, message: str, rank: int | None = None, reports: list[dict] | None = None):
        super().__init__(message)
        self.rank = rank
        self.reports = reports or []


class InsufficientSlotsError(MPIJobError):
    """The cluster cannot run every rank at once, so the job was not started."""


class UnschedulableResourcesError(InsufficientSlotsError, ValueError):
    """The Spark conf asks for task resources (GPUs) that this master cannot schedule, such as
    local mode's; the job was not started."""


def error_from_reports(job_id: str, size: int, reports: list[dict]) -> MPIJobError:
    """One exception for a failed job: the first failing rank, its reason, traceback, stderr."""
    first = reports[0]
    rank = first.get("rank")
    merged: dict = {}
    for report in reports:
        if report.get("rank") == rank:
            for key, value in report.items():
                if value not in (None, "") and key not in merged:
                    merged[key] = value
    who = f"MPI rank {rank} of {size}" if rank is not None else f"MPI job {job_id}"
    where = f" on {merged['host']}" if merged.get("host") else ""
    lines = [f"{who}{where} failed: {merged.get('reason', 'unknown reason')}"]
    if merged.get("traceback"):
        lines += ["", f"Traceback from rank {rank}:", merged["traceback"].rstrip()]
    elif merged.get("stderr"):
        lines += ["", f"Last stderr lines of rank {rank}:", merged["stderr"].rstrip()]
    return MPIJobError("\n".join(lines), rank=rank, reports=reports)
