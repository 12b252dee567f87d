"""A SparkSession set up for MPI jobs, for the command line and the benchmarks."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from sparkmpi.runner.addresses import driver_host_for


def spark_session(
    master: str | None = None,
    cores: int = 2,
    app_name: str = "spark-mpi",
    conf: Mapping[str, str] | None = None,
):
    """A SparkSession on ``master`` (default: the one given to ``spark-submit`` when launched
    by it, else ``local[cores]``) whose Python workers run this interpreter, with the web UI and
    console progress bar off and ``conf`` applied.

    For a ``spark://`` master, unless ``SPARK_LOCAL_IP`` or ``conf`` name the driver's address,
    ``spark.driver.host`` is set to this machine's source address on the route to the master:
    on a driver with several interfaces, the one its workers' network reaches."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    conf = dict(conf or {})
    builder = SparkSession.builder
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # spark-submit sets the gateway
        builder = builder.master(master or f"local[{cores}]")
        if "spark.driver.host" not in conf and not os.environ.get("SPARK_LOCAL_IP"):
            host = driver_host_for(master)
            if host:
                conf["spark.driver.host"] = host
    builder = builder.appName(app_name)
    settings = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", **conf}
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
