"""A SparkSession set up for MPI jobs, for the command line and the benchmarks."""

from __future__ import annotations

import os
import sys


def spark_session(master: str | None = None, cores: int = 2, app_name: str = "spark-mpi"):
    """A SparkSession on ``master`` (default: the one given to ``spark-submit`` when launched
    by it, else ``local[cores]``) whose Python workers run this interpreter, with the web UI and
    console progress bar off."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # spark-submit sets the gateway
        builder = builder.master(master or f"local[{cores}]")
    spark = (
        builder.appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark
