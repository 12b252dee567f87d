"""Benchmarks behind ``spark-mpi bench ...``: each prints ratios against a baseline measured
in the same run and writes JSON and a PNG plot."""
