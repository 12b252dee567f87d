"""``spark-mpi stream broker | produce | run``: the three terminals of the streaming demo."""

from __future__ import annotations

import argparse
import signal
import time


def _exit_on_sigterm() -> None:
    """SIGTERM ends the command like Ctrl-C, so brokers and ranks it started are stopped."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _seconds(text: str) -> float:
    text = text.strip().lower()
    value = float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive duration like 2s or 500ms")
    return value


def cmd_broker(args: argparse.Namespace) -> int:
    from sparkmpi.streaming.broker import TansuBroker

    _exit_on_sigterm()
    with TansuBroker(args.port, args.host) as broker:
        print(
            f"Kafka-protocol broker (Tansu, in memory) at {broker.url}; Ctrl-C or SIGTERM stops it",
            flush=True,
        )
        try:
            while broker.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.cxi import read_cxi
    from sparkmpi.streaming.producer import produce

    scan = read_cxi(args.scan)
    done = produce(scan, args.to, args.rate, args.scan_id, log=print)
    span = done["last"] - done["first"]
    print(f"scan {done['scan_id']}: {done['frames']} frames sent to {args.to} in {span:.1f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.solver import SolverSettings
    from sparkmpi.runner.context import spark_session
    from sparkmpi.streaming.driver import StreamDriver, StreamSettings
    from sparkmpi.streaming.endpoints import check

    settings = StreamSettings(
        args.batch_interval, args.iterations, args.final_iterations, args.ranks
    )
    check(args.source)  # before Spark starts, so a bad source is one clear line
    _exit_on_sigterm()
    spark = spark_session(args.master, cores=args.ranks, app_name="spark-mpi stream")
    try:
        with StreamDriver(
            spark,
            args.source,
            args.out,
            settings,
            app=args.app,
            app_settings=SolverSettings(args.algorithm),
            log=lambda line: print(line, flush=True),
        ) as driver:
            for _ in range(args.scans):
                summary = driver.run_scan(timeout=args.wait)
                if summary is None:
                    print(f"no scan started within {args.wait:.0f} s", flush=True)
                    return 1
                print(f"final result: {summary['file']}", flush=True)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 130
    finally:
        spark.stop()
    return 0


def add_commands(sub) -> None:
    """Registers ``stream`` and its subcommands on the ``spark-mpi`` parser."""
    stream = sub.add_parser("stream", help="streaming: broker, producer, micro-batch pipeline")
    stream_sub = stream.add_subparsers(dest="stream", required=True)

    broker = stream_sub.add_parser("broker", help="run a local Kafka-protocol broker (Tansu)")
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=cmd_broker)

    produce = stream_sub.add_parser("produce", help="replay a CXI scan as a detector stream")
    produce.add_argument("--scan", required=True, help="CXI file (spark-mpi ptycho simulate)")
    produce.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC or zmq://HOST:PORT")
    produce.add_argument("--rate", type=float, default=20.0, help="frames per second (20; 0: max)")
    produce.add_argument("--scan-id", help="scan id (default: random)")
    produce.set_defaults(func=cmd_produce)

    run = stream_sub.add_parser("run", help="the micro-batch pipeline into MPI ranks")
    run.add_argument("--source", required=True, help="kafka://HOST:PORT/TOPIC or zmq://HOST:PORT")
    run.add_argument("--app", default="ptycho", choices=("ptycho",))
    run.add_argument("--out", default="stream-out", help="results and checkpoints (stream-out)")
    run.add_argument("--batch-interval", type=_seconds, default=2.0, help="e.g. 2s or 500ms")
    run.add_argument("--iterations", type=int, default=10, help="solver iterations per batch")
    run.add_argument("--final-iterations", type=int, default=50, help="after the scan ends")
    run.add_argument("--algorithm", choices=("raar", "dm"), default="raar")
    run.add_argument("--ranks", type=int, default=2)
    run.add_argument("--scans", type=int, default=1, help="scans to process before exiting")
    run.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a scan")
    run.add_argument("--master", help="Spark master URL (default local[RANKS])")
    run.set_defaults(func=cmd_run)
