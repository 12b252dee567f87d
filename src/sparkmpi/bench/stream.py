"""``spark-mpi bench stream``: a scan streamed at a detector's rate through Kafka and ZeroMQ.

For each transport: a 512-frame scan (128² frames) produced at 20 Hz, reconstructed
progressively by the micro-batch driver; measured are the latency of each batch (result
durable minus the newest frame's production time), the time from the last frame produced to
the final reconstruction, frames lost or applied twice (counted by the ranks); then the same
scan produced as fast as possible, whose ingest rate (frames / time from the first frame to
the batch holding the last one) is the highest rate the pipeline sustains with these settings.

``--faults``: the fault table of :mod:`sparkmpi.bench.stream_faults` instead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading

from sparkmpi.bench.report import bar_plot, print_table, write_json


def _run(driver, scan, url: str, rate: float) -> tuple[dict, list[dict], dict]:
    from sparkmpi.apps.ptycho.streaming import produce

    sent: dict = {}
    producer = threading.Thread(target=lambda: sent.update(produce(scan, url, rate)))
    producer.start()
    summary = driver.run_scan(timeout=120)
    producer.join(120)
    if summary is None:
        raise RuntimeError(f"{url}: no scan arrived")
    return summary, list(driver.history), sent


def _applied(path: str):
    """How many times the ranks gave each frame to the solver (from the final result)."""
    import h5py

    with h5py.File(path) as f:
        return f["applied"][()]


def main(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.simulate import simulate
    from sparkmpi.apps.ptycho.solver import SolverSettings
    from sparkmpi.deploy.ports import free_port
    from sparkmpi.runner.context import spark_session
    from sparkmpi.streaming.broker import TansuBroker
    from sparkmpi.streaming.driver import StreamDriver, StreamSettings

    if args.faults:
        from sparkmpi.bench.stream_faults import main as faults

        return faults(args)
    if args.quick:
        args.frames, args.size, args.rate = 64, 64, 40.0
    scan = simulate(args.frames, args.size)
    settings = StreamSettings(args.batch_interval, args.iterations, args.final_iterations, 2)
    spark = spark_session(args.master, cores=settings.ranks, app_name="spark-mpi bench stream")
    results = []
    quiet = lambda line: None  # noqa: E731
    try:
        with TansuBroker() as broker, tempfile.TemporaryDirectory() as out:
            for transport in args.transports.split(","):
                url = (
                    f"{broker.url}/bench"
                    if transport == "kafka"
                    else f"zmq://127.0.0.1:{free_port()}"
                )
                with StreamDriver(
                    spark, url, out, settings, app_settings=SolverSettings(), log=quiet
                ) as driver:
                    summary, history, _ = _run(driver, scan, url, args.rate)
                    applied = _applied(summary["file"])
                    fast, fast_history, sent = _run(driver, scan, url, 0.0)
                latencies = [b["latency_s"] for b in history if b["latency_s"] is not None]
                last_ingest = max(
                    (b for b in fast_history if not b["final"] and b["new_frames"]),
                    key=lambda b: b["batch"],
                )
                ingest_done = last_ingest["time"]
                results.append(
                    {
                        "transport": transport,
                        "frames": args.frames,
                        "frame_size": args.size,
                        "rate_hz": args.rate,
                        "last_frame_to_result_s": summary["last_frame_to_result_s"],
                        "frames_lost": int((applied == 0).sum()),
                        "frames_applied_twice": int((applied > 1).sum()),
                        "batch_latency_s": latencies,
                        "median_batch_latency_s": statistics.median(latencies),
                        "batches": len(history),
                        "max_rate_hz": args.frames / (ingest_done - sent["first"]),
                        "max_rate_last_frame_to_result_s": fast["last_frame_to_result_s"],
                    }
                )
    finally:
        spark.stop()
    print_table(
        f"Streaming {args.frames} frames of {args.size}² at {args.rate:g} Hz, batches every "
        f"{args.batch_interval:g} s, 2 ranks",
        [
            "transport",
            "last frame → result s",
            "median batch latency s",
            "lost",
            "twice",
            "max rate Hz",
        ],
        [
            [
                r["transport"],
                r["last_frame_to_result_s"],
                r["median_batch_latency_s"],
                r["frames_lost"],
                r["frames_applied_twice"],
                r["max_rate_hz"],
            ]
            for r in results
        ],
    )
    write_json(args.json, {"results": results, "settings": vars(settings)})
    bar_plot(
        args.plot,
        f"Last frame → final reconstruction, {args.frames} frames at {args.rate:g} Hz",
        [f"{r['transport']}: last frame → result" for r in results]
        + [f"{r['transport']}: median batch latency" for r in results],
        [r["last_frame_to_result_s"] for r in results]
        + [r["median_batch_latency_s"] for r in results],
    )
    return 0
