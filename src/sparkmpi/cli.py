"""The ``spark-mpi`` command: ``run``, ``info``, the apps (``tomo``, ``ptycho``) and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import sys

from sparkmpi import __version__
from sparkmpi.durations import duration
from sparkmpi.runner.runtime import RUNTIMES

APPS = {
    "tomo": "sparkmpi.apps.tomo.cli",
    "ptycho": "sparkmpi.apps.ptycho.cli",
    "stream": "sparkmpi.streaming.cli",
    "cluster": "sparkmpi.deploy.cli",
    "slurm": "sparkmpi.deploy.cli",
    "view": "sparkmpi.viz.cli",
}


def _cmd_run(args: argparse.Namespace) -> int:
    from sparkmpi.runner import MPIJobError, run_script
    from sparkmpi.runner.context import spark_session

    try:
        conf = parse_conf(args.conf)
        env = parse_conf(args.env, option="--env")
    except ValueError as exc:
        print(f"spark-mpi run: {exc}", file=sys.stderr)
        return 2
    spark = spark_session(args.master, cores=args.ranks, conf=conf)
    try:
        run_script(
            spark,
            args.script,
            args.args,
            ranks=args.ranks,
            runtime=args.runtime,
            env=env or None,
            timeout=args.timeout,
            pmi_host=args.pmi_host,
        )
    except (MPIJobError, FileNotFoundError, ValueError) as exc:
        print(f"spark-mpi run: {exc}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    return 0


def parse_conf(pairs: list[str] | None, option: str = "--conf") -> dict[str, str]:
    """``["k=v", ...]`` from a repeated option as a dict; ValueError naming a bad one."""
    conf = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {pair!r}: expected KEY=VALUE")
        conf[key.strip()] = value
    return conf


def _cmd_info(args: argparse.Namespace) -> int:
    from sparkmpi.info import collect_info

    for key, value in collect_info().items():
        print(f"{key:>16}: {value}")
    return 0


def _bench(name: str):
    """The ``spark-mpi bench NAME`` command: ``sparkmpi.bench.NAME.main``, imported on use."""

    def command(args: argparse.Namespace) -> int:
        return importlib.import_module(f"sparkmpi.bench.{name}").main(args)

    return command


def _run_app(args: argparse.Namespace) -> int:
    """Runs an app command; bad input or a failed job ends in one line on stderr, status 1."""
    from sparkmpi.files import InputFileError
    from sparkmpi.runner import MPIJobError

    try:
        return int(args.func(args) or 0)
    except (InputFileError, MPIJobError, ValueError, RuntimeError, OSError) as exc:
        sub = getattr(args, args.command, None)
        name = f"spark-mpi {args.command}" + (f" {sub}" if sub and sub != args.command else "")
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            exc = f"{exc.filename}: {exc.strerror}"  # any file-system error names its path
        print(f"{name}: {exc}", file=sys.stderr)
        return 1


def _bench_outputs(
    parser: argparse.ArgumentParser,
    module: str,
    master: str | None = "local mode",
    what: str = "figures",
) -> None:
    """The options every benchmark shares (``--master`` unless ``master`` is None, ``--json``,
    ``--plot``); the command runs ``sparkmpi.bench.<module>``."""
    if master is not None:
        parser.add_argument("--master", help=f"Spark master URL (default {master})")
    parser.add_argument("--json", help=f"write the {what} as JSON here")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.set_defaults(func=_bench(module))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-mpi", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spark-mpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an mpi4py script as N ranks on Spark, like mpiexec")
    run.add_argument(
        "--ranks", "--np", "-n", dest="ranks", type=int, default=1, help="number of ranks (1)"
    )
    run.add_argument("--master", help="Spark master URL (default local[RANKS])")
    run.add_argument("--runtime", choices=RUNTIMES, default="mpich")
    run.add_argument("--timeout", type=duration, help="fail the job after this long (e.g. 10m)")
    run.add_argument(
        "--env", action="append", metavar="KEY=VALUE", help="set in every rank (repeatable)"
    )
    run.add_argument(
        "--pmi-host", help="driver address the executors reach (default: see docs/deployment.md)"
    )
    run.add_argument(
        "--conf", action="append", metavar="KEY=VALUE", help="a Spark setting (repeatable)"
    )
    run.add_argument("script", help="the Python script every rank runs")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.set_defaults(func=_cmd_run)

    info = sub.add_parser("info", help="versions of Spark, Java, MPI and the PMI server address")
    info.set_defaults(func=_cmd_info)

    for module in dict.fromkeys(APPS.values()):
        importlib.import_module(module).add_commands(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    launch = bench_sub.add_parser("launch", help="job launch time: Spark vs mpiexec")
    launch.add_argument("--ranks", type=int, default=2)
    launch.add_argument("--repeat", type=int, default=10)
    launch.add_argument("--submissions", type=int, default=50)
    launch.add_argument("--gap", type=duration, default=0.5, help="idle before each launch (500ms)")
    _bench_outputs(launch, "launch", master="local[RANKS]")
    allreduce = bench_sub.add_parser(
        "allreduce", help="sum of arrays: Spark collect/treeReduce vs MPI Allreduce (Table I)"
    )
    allreduce.add_argument(
        "--ranks", help="comma-separated rank counts (1,2,4,8; with --netns/--cluster 1,2,3)"
    )
    allreduce.add_argument("--size", type=int, default=2_000_000, help="float32 per rank")
    allreduce.add_argument("--repeat", type=int, default=10)
    allreduce.add_argument("--master", help="Spark master URL (default local[max ranks])")
    allreduce.add_argument("--quick", action="store_true", help="small arrays, N = 1, 2")
    allreduce.add_argument(
        "--netns", type=int, metavar="N", help="on a new cluster of N network namespaces (root)"
    )
    allreduce.add_argument("--cluster", help="on the namespace cluster in this state directory")
    allreduce.add_argument("--rate", default="10gbit", help="node link rate with --netns (10gbit)")
    allreduce.add_argument("--delay", help="node link delay with --netns, e.g. 0.1ms (netem)")
    allreduce.add_argument("--subnet", default="10.88.0.0/24", help="--netns cluster's subnet")
    _bench_outputs(allreduce, "allreduce", master=None, what="results")
    tomo = bench_sub.add_parser("tomo", help="ART iteration time on 256³: workers vs textbook loop")
    tomo.add_argument("--size", type=int, default=256, help="volume edge (256)")
    tomo.add_argument(
        "--ranks", "--workers", dest="ranks", default="1,2", help="comma-separated rank counts"
    )
    tomo.add_argument("--iterations", type=int, default=3, help="ART iterations timed (3)")
    tomo.add_argument("--textbook-slices", type=int, default=2, help="slices of the slow loop")
    tomo.add_argument(
        "--scale", action="store_true", help="instead: FBP end to end at --sizes vs ASTRA"
    )
    tomo.add_argument("--sizes", default="256,512", help="with --scale: volume edges (256,512)")
    tomo.add_argument("--projections", type=int, default=360, help="with --scale (360)")
    tomo.add_argument(
        "--library-slices", type=int, default=8, help="with --scale: slices the library times"
    )
    _bench_outputs(tomo, "tomo")
    ptycho = bench_sub.add_parser("ptycho", help="ptychography solver: 1 and 2 ranks vs FFT bound")
    ptycho.add_argument("--frames", type=int, default=512, help="diffraction frames (512)")
    ptycho.add_argument("--size", type=int, default=128, help="frame edge (128)")
    ptycho.add_argument("--iterations", type=int, default=100, help="solver iterations (100)")
    ptycho.add_argument("--ranks", default="1,2", help="comma-separated rank counts (1,2)")
    ptycho.add_argument("--algorithm", choices=("raar", "dm"), default="raar")
    ptycho.add_argument("--quick", action="store_true", help="64 frames of 64², 10 iterations")
    _bench_outputs(ptycho, "ptycho")
    from sparkmpi.bench.gpu import add_arguments as gpu_arguments

    gpu = bench_sub.add_parser("gpu", help="solvers on one GPU vs its FFT bound and the CPU")
    gpu_arguments(gpu).set_defaults(func=_bench("gpu"))
    from sparkmpi.bench.conformance import add_arguments as conformance_arguments

    conformance = bench_sub.add_parser(
        "conformance", help="mpi4py's test suite: spark-mpi run vs mpiexec, per MPI library"
    )
    conformance_arguments(conformance).set_defaults(func=_bench("conformance"))
    faults = bench_sub.add_parser(
        "faults", help="faults under a job on a namespace cluster; driver under floods"
    )
    faults.add_argument(
        "--faults",
        default="link-down,task-killed,worker-killed,helper-child,pmi-filtered,wrong-pmi-host",
        help="which faults (comma-separated; empty: none)",
    )
    faults.add_argument("--repeat", type=int, default=1, help="runs of each fault (1)")
    faults.add_argument("--cluster", help="use the namespace cluster in this state directory")
    faults.add_argument("--subnet", default="10.87.0.0/24", help="its subnet if one is made")
    faults.add_argument(
        "--flood-connections", type=int, default=1100, help="idle connections (0: no floods)"
    )
    _bench_outputs(faults, "faults", master=None, what="results")
    stream = bench_sub.add_parser("stream", help="streamed scan through Kafka and ZeroMQ")
    stream.add_argument("--frames", type=int, default=512, help="frames in the scan (512)")
    stream.add_argument("--size", type=int, default=128, help="frame edge (128)")
    stream.add_argument("--rate", type=float, default=20.0, help="frames per second (20)")
    stream.add_argument("--transports", default="kafka,zmq", help="kafka,zmq")
    stream.add_argument("--batch-interval", type=duration, default=2.0, help="e.g. 2s, 500ms (2s)")
    stream.add_argument("--iterations", type=int, default=10, help="iterations per batch (10)")
    stream.add_argument("--final-iterations", type=int, default=50, help="after the scan (50)")
    stream.add_argument("--quick", action="store_true", help="64 frames of 64² at 40 Hz")
    stream.add_argument(
        "--faults", action="store_true", help="inject faults; lost/twice/recovery/error table"
    )
    _bench_outputs(stream, "stream")

    tomo_stream = bench_sub.add_parser("stream-tomo", help="streamed tomography (FBP) via ZeroMQ")
    tomo_stream.add_argument("--size", type=int, default=256, help="detector edge = volume (256)")
    tomo_stream.add_argument("--projections", type=int, default=361, help="over 180° (361)")
    tomo_stream.add_argument("--rate", type=float, default=100.0, help="projections/s (100)")
    tomo_stream.add_argument("--batch-interval", type=duration, default=1.0, help="1s")
    tomo_stream.add_argument("--quick", action="store_true", help="91 projections of 48²")
    _bench_outputs(tomo_stream, "stream_tomo")

    bluesky = bench_sub.add_parser(
        "stream-bluesky", help="a Bluesky run via Kafka vs its CXI file (phase error)"
    )
    bluesky.add_argument("--frames", type=int, default=256, help="frames in the scan (256)")
    bluesky.add_argument("--size", type=int, default=128, help="frame edge (128)")
    bluesky.add_argument("--batch-interval", type=duration, default=0.5, help="500ms")
    bluesky.add_argument("--iterations", type=int, default=5, help="iterations per batch (5)")
    bluesky.add_argument("--final-iterations", type=int, default=60, help="after the scan (60)")
    bluesky.add_argument(
        "--live", action="store_true", help="produce while the driver follows (default: before)"
    )
    bluesky.add_argument("--quick", action="store_true", help="32 frames of 64²")
    _bench_outputs(bluesky, "stream_bluesky")

    v2 = bench_sub.add_parser("stream-v2", help="DECTRIS Stream V2 ingest into the ranks")
    v2.add_argument("--frames", type=int, default=4000, help="images per run (4000)")
    v2.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    v2.add_argument("--ranks", type=int, default=2)
    v2.add_argument("--batch-interval", type=duration, default=0.5, help="500ms")
    _bench_outputs(v2, "stream_v2", master="local[RANKS]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.ranks < 1:
        print("spark-mpi run: --ranks must be at least 1", file=sys.stderr)
        return 2
    if args.command in APPS:
        return _run_app(args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
