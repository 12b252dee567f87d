"""Near-real-time streaming: scans arrive as records over Kafka or ZeroMQ, a micro-batch
driver hands each batch to a persistent MPI session, and every batch's result is published.

Public entry point: :class:`sparkmpi.streaming.driver.StreamDriver` (and ``spark-mpi stream``).
"""
