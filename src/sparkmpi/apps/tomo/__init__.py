"""Tomography on Spark (the seed paper's §IV): tilt series → Parquet → per-slice
reconstruction (ART, SIRT, FBP) as MPI ranks or Spark tasks → volume.

Public entry point: :func:`sparkmpi.apps.tomo.pipeline.reconstruct` (and ``spark-mpi tomo``).
"""
