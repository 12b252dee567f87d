"""Peak memory of this process, as the benchmarks and run records report it."""

from __future__ import annotations

import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Starts a new peak-RSS window for this process (Linux: ``/proc/self/clear_refs``), so a
    reused interpreter reports the peak of the work that follows; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib(pid: int | None = None) -> float | None:
    """The peak resident set size in MiB of this process (since it started or since
    :func:`reset_peak_rss`), or of process ``pid`` (None if it cannot be read)."""
    try:
        status = Path(f"/proc/{pid or 'self'}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid is not None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spark_jvm_peak_rss_mib(spark) -> float | None:
    """The peak RSS of the JVM a local PySpark session started (in local mode the driver and
    its executors), or None where there is none to read (Spark Connect, another host)."""
    process = getattr(getattr(spark.sparkContext, "_gateway", None), "proc", None)
    return peak_rss_mib(process.pid) if process is not None else None
