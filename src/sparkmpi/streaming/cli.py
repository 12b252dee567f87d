"""``spark-mpi stream broker | produce | run``: the three terminals of the streaming demo."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from sparkmpi.durations import duration


def _exit_on_sigterm() -> None:
    """SIGTERM ends the command like Ctrl-C, so brokers and ranks it started are stopped."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _access(args: argparse.Namespace):
    from sparkmpi.streaming.access import StreamAccess

    return StreamAccess.load(args.kafka_config, args.zmq_keys, getattr(args, "data_root", ()))


def _add_access_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kafka-config",
        metavar="FILE",
        help="librdkafka settings (key=value lines) for every Kafka client, e.g. TLS or SASL",
    )
    parser.add_argument(
        "--zmq-keys", metavar="DIR", help="ZeroMQ CURVE keys (made by: spark-mpi stream keys DIR)"
    )


def cmd_keys(args: argparse.Namespace) -> int:
    from sparkmpi.streaming.access import make_keys

    for path in make_keys(args.dir, args.producer):
        print(path)
    if args.producer:
        print(f"give {args.dir}/producers/{args.producer} to that producer as its --zmq-keys;")
        print("restart the driver to accept the new key")
    else:
        print(f"driver: --zmq-keys {args.dir}; a producer needs server.key, client.key and")
        print("client.key_secret only (never server.key_secret)")
    return 0


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


def _scan_to_produce(args: argparse.Namespace):
    """The scan-start, frames and Stream V2 detector fields ``stream produce`` sends."""
    if args.app == "tomo":
        from sparkmpi.apps.tomo.streaming import scan_to_stream

        counts = args.format == "stream-v2"  # a detector sends counts
        start, frames = scan_to_stream(
            args.scan, args.phantom, args.projections, args.order, counts
        )
        return start, frames, {}
    from sparkmpi.apps.ptycho.cxi import read_cxi
    from sparkmpi.apps.ptycho.streaming import stream_v2_series

    if args.scan is None:
        raise SystemExit("spark-mpi stream produce: --app ptycho needs --scan FILE.cxi")
    return stream_v2_series(read_cxi(args.scan))


def cmd_produce(args: argparse.Namespace) -> int:
    import dataclasses

    from sparkmpi.streaming.producer import replay
    from sparkmpi.streaming.protocol import scan_id_or_new

    access = _access(args)
    start, frames, detector = _scan_to_produce(args)
    if args.format == "stream-v2":
        from sparkmpi.streaming.stream_v2_sim import produce_stream_v2

        print(f"a Stream V2 detector at {args.to}: waiting for a client to connect")
        done = produce_stream_v2(
            start, frames, args.to, args.rate, args.series_id, log=print, detector=detector
        )
    else:
        scan_id = scan_id_or_new(args.scan_id)
        start = dataclasses.replace(start, scan_id=scan_id)
        done = replay(start, frames, args.to, args.rate, log=print, access=access)
    span = done["last"] - done["first"]
    print(f"scan {done['scan_id']}: {done['frames']} frames sent to {args.to} in {span:.1f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.solver import SolverSettings
    from sparkmpi.runner.context import spark_session
    from sparkmpi.streaming.driver import StreamDriver, StreamFailed, StreamSettings
    from sparkmpi.streaming.endpoints import check

    settings = StreamSettings(
        args.batch_interval,
        args.iterations,
        args.final_iterations,
        args.ranks,
        batch_timeout=args.batch_timeout,
        max_recoveries=args.max_recoveries,
        idle_timeout=args.idle_timeout,
    )
    access = _access(args)
    check(args.source, access)  # before Spark starts, so a bad source is one clear line
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
            access=access,
        ) as driver:
            out = Path(args.out).resolve()
            print(f"reading {args.source}, writing results to {out}", flush=True)
            for _ in range(args.scans):
                print("waiting for a scan to start ...", flush=True)
                summary = driver.run_scan(timeout=args.wait)
                if summary is None:
                    print(f"no scan started within {args.wait:.0f} s", flush=True)
                    return 1
                print(f"final result: {summary['file']}", flush=True)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 130
    except StreamFailed as exc:
        print(f"spark-mpi stream run: {exc}", file=sys.stderr, flush=True)
        return 1
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

    produce = stream_sub.add_parser("produce", help="replay a scan as a detector stream")
    produce.add_argument("--app", default="ptycho", choices=("ptycho", "tomo"))
    produce.add_argument(
        "--scan",
        help="ptycho: a CXI file (spark-mpi ptycho simulate); tomo: a tilt series (TIFF, or "
        "Data Exchange HDF5: its counts, white and dark images are sent) or none: a phantom",
    )
    produce.add_argument("--phantom", type=int, default=64, help="tomo: phantom size (64)")
    produce.add_argument("--projections", type=int, default=180, help="tomo: phantom angles")
    produce.add_argument(
        "--order", choices=("sequential", "golden"), default="sequential", help="tomo: angles"
    )
    produce.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC or zmq://HOST:PORT")
    produce.add_argument("--rate", type=float, default=20.0, help="frames per second (20; 0: max)")
    produce.add_argument("--scan-id", help="scan id (default: random)")
    produce.add_argument(
        "--format",
        choices=("sparkmpi", "stream-v2"),
        default="sparkmpi",
        help="stream-v2: act as a DECTRIS detector, binding --to stream-v2://HOST:PORT",
    )
    produce.add_argument("--series-id", type=int, default=1, help="stream-v2 series number")
    _add_access_options(produce)
    produce.set_defaults(func=cmd_produce)

    run = stream_sub.add_parser("run", help="the micro-batch pipeline into MPI ranks")
    run.add_argument(
        "--source",
        required=True,
        help="kafka://HOST:PORT/TOPIC, zmq://HOST:PORT, stream-v2://DETECTOR:PORT (DECTRIS) "
        "or bluesky+kafka://HOST:PORT/TOPIC",
    )
    run.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose files received documents may name (Bluesky resources); repeat",
    )
    run.add_argument("--app", default="ptycho", choices=("ptycho", "tomo"))
    run.add_argument("--out", default="stream-out", help="results and checkpoints (stream-out)")
    run.add_argument("--batch-interval", type=duration, default=2.0, help="e.g. 2s or 500ms")
    run.add_argument("--iterations", type=int, default=10, help="solver iterations per batch")
    run.add_argument("--final-iterations", type=int, default=50, help="after the scan ends")
    run.add_argument("--algorithm", choices=("raar", "dm"), default="raar")
    run.add_argument("--ranks", type=int, default=2)
    run.add_argument("--scans", type=int, default=1, help="scans to process before exiting")
    run.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a scan")
    run.add_argument(
        "--batch-timeout", type=duration, help="deadline of one batch (30 intervals, >= 60s)"
    )
    run.add_argument(
        "--max-recoveries", type=int, default=3, help="failed batches in a row to recover from"
    )
    run.add_argument(
        "--idle-timeout",
        type=duration,
        default=300.0,
        help="close a scan as incomplete after this long without frames or scan-end (300s)",
    )
    run.add_argument("--master", help="Spark master URL (default local[RANKS])")
    _add_access_options(run)
    run.set_defaults(func=cmd_run)

    keys = stream_sub.add_parser("keys", help="make ZeroMQ CURVE keys for --zmq-keys")
    keys.add_argument("dir", help="directory to create (mode 0700)")
    keys.add_argument(
        "--producer", metavar="NAME", help="add keys for one more producer to an existing DIR"
    )
    keys.set_defaults(func=cmd_keys)
