"""Ptychography on Spark (the seed paper's §III): simulated far-field scans, CXI files, and the
difference map / RAAR solver with frames split over MPI ranks (update sums Allreduced every
iteration, as in SHARP).

Public entry point: :func:`sparkmpi.apps.ptycho.pipeline.reconstruct` (and ``spark-mpi ptycho``).
"""
