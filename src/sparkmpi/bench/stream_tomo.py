"""``spark-mpi bench stream-tomo``: a tomography scan streamed through ZeroMQ into the streaming
FBP (2 ranks, a slab of slices each).

A blobs phantom (size³) is projected at ``projections`` angles over 180°, and the projections
are produced in golden-angle order at ``rate`` Hz. Measured: the time from the last projection
produced to the final volume being durable (the goal: ≤ 2 s for 361 projections of 256² at
100 Hz), each batch's latency (volume durable minus the newest projection in it) against the
batch interval (after a 4-projection warm-up scan has started the MPI session), and how far
the final volume is from the batch FBP of the same projections
(FBP is linear, so it should be float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time


def main(args: argparse.Namespace) -> int:
    import h5py
    import numpy as np

    from sparkmpi.apps.tomo.algorithms import fbp
    from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series
    from sparkmpi.apps.tomo.streaming import golden_order, produce
    from sparkmpi.bench.report import bar_plot, print_table, write_json
    from sparkmpi.deploy.ports import free_port
    from sparkmpi.runner.context import spark_session
    from sparkmpi.streaming.driver import StreamDriver, StreamSettings

    if args.quick:
        args.size, args.projections, args.rate = 48, 91, 100.0
    n = args.size
    started = time.perf_counter()
    angles = np.linspace(0, 180, args.projections, endpoint=False)
    projections = simulate_tilt_series(blobs_phantom((n, n, n)), angles)
    print(
        f"projected a {n}³ phantom at {len(angles)} angles in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    order = golden_order(len(angles))
    settings = StreamSettings(args.batch_interval, 1, 1, 2)
    spark = spark_session(args.master, cores=2, app_name="spark-mpi bench stream-tomo")
    url = f"zmq://127.0.0.1:{free_port()}"
    sent: dict = {}
    try:
        with (
            tempfile.TemporaryDirectory() as out,
            StreamDriver(spark, url, out, settings, app="tomo", log=lambda line: None) as driver,
        ):
            warm = threading.Thread(
                target=produce, args=(projections[:4], angles[:4], url, 0.0, "tomo-warm-up")
            )
            warm.start()
            driver.run_scan(timeout=600)  # starts the session: not part of the figures
            warm.join(600)
            producer = threading.Thread(
                target=lambda: sent.update(
                    produce(projections[order], angles[order], url, args.rate, "tomo-bench")
                )
            )
            producer.start()
            summary = driver.run_scan(timeout=600)
            producer.join(600)
            history = list(driver.history)
            with h5py.File(summary["file"]) as f:
                streamed = f["volume"][()]
    finally:
        spark.stop()
    batch = fbp(projections.transpose(1, 0, 2), angles, n)
    scale = float(np.abs(batch).max())
    latencies = [b["latency_s"] for b in history if b["latency_s"] is not None]
    result = {
        "size": n,
        "projections": len(angles),
        "rate_hz": args.rate,
        "batch_interval_s": args.batch_interval,
        "last_projection_to_volume_s": summary["last_frame_to_result_s"],
        "batch_latency_s": latencies,
        "median_batch_latency_s": statistics.median(latencies),
        "max_batch_latency_s": max(latencies),
        "batches": len(history),
        "frames_lost": summary["frames_lost"],
        "frames_applied_twice": summary["frames_applied_twice"],
        "max_difference_from_batch_fbp": float(np.abs(streamed - batch).max()) / scale,
        "scan_s": sent["last"] - sent["first"],
    }
    print_table(
        f"Streaming tomography: {len(angles)} projections of {n}² at {args.rate:g} Hz "
        f"(golden-angle order), batches every {args.batch_interval:g} s, 2 ranks",
        [
            "last projection → volume s",
            "median batch latency s",
            "max batch latency s",
            "lost",
            "twice",
            "max |streamed - batch FBP| / max",
        ],
        [
            [
                result["last_projection_to_volume_s"],
                result["median_batch_latency_s"],
                result["max_batch_latency_s"],
                result["frames_lost"],
                result["frames_applied_twice"],
                f"{result['max_difference_from_batch_fbp']:.1e}",
            ]
        ],
    )
    write_json(args.json, result)
    bar_plot(
        args.plot,
        f"Streaming tomography, {len(angles)} projections of {n}² at {args.rate:g} Hz",
        ["last projection → final volume", "median batch latency", "max batch latency"],
        [
            result["last_projection_to_volume_s"],
            result["median_batch_latency_s"],
            result["max_batch_latency_s"],
        ],
    )
    return 0
