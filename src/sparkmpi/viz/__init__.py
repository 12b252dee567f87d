"""Web viewer (trame): volumes and images from the apps, and live results from streaming.

Public entry point: :func:`sparkmpi.viz.app.serve` (and ``spark-mpi view``).
"""
