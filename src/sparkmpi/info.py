"""What ``spark-mpi info`` reports: versions of everything a job depends on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def _java_version() -> str:
    java = (
        os.path.join(os.environ["JAVA_HOME"], "bin", "java")
        if "JAVA_HOME" in os.environ
        else shutil.which("java")
    )
    if not java:
        return "not found (Spark needs Java 17 or newer)"
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    return match.group(1) if match else "unknown"


def collect_info() -> dict[str, str]:
    """Name -> version or address, for every part a job depends on."""
    import mpi4py
    import pyspark

    from sparkmpi import __version__
    from sparkmpi.pmi import PMIServer
    from sparkmpi.runner.runtime import RUNTIMES, RuntimeNotFound, get_runtime

    info = {
        "spark-mpi": __version__,
        "Spark": pyspark.__version__,
        "Java": _java_version(),
        "mpi4py": mpi4py.__version__,
    }
    for name in RUNTIMES:
        try:
            info[f"MPI ({name})"] = get_runtime(name).library_version()
        except RuntimeNotFound as exc:
            info[f"MPI ({name})"] = f"not installed: {exc}"
    host = os.environ.get("SPARKMPI_PMI_HOST", "127.0.0.1")
    with PMIServer(host) as server:
        address = "{}:{}".format(*server.address)
    info["PMI server"] = (
        f"binds {host} (checked: listened on {address}); local mode uses loopback, clusters "
        "spark.driver.host (its bindAddress to bind); override with --pmi-host, "
        "SPARKMPI_PMI_HOST or spark.sparkmpi.pmi.host"
    )
    return info
