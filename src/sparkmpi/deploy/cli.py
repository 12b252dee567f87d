"""``spark-mpi cluster start | stop | status | worker`` and ``spark-mpi slurm script | submit``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sparkmpi.durations import duration


def _cores(text: str) -> list[int]:
    try:
        cores = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or N,N,... cores") from None
    if min(cores) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: cores must be positive")
    return cores


def _state_dir(args: argparse.Namespace) -> str:
    from sparkmpi.deploy.netns import DEFAULT_STATE as NETNS_STATE
    from sparkmpi.deploy.standalone import DEFAULT_STATE

    if args.state_dir:
        return args.state_dir
    return str(NETNS_STATE if args.netns else DEFAULT_STATE)


def _start_netns(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.netns import NetnsCluster, netns_unavailable

    why = netns_unavailable()
    if why:
        raise RuntimeError(f"cannot build a namespace cluster here: {why}")
    cores = args.cores[0] if len(args.cores) == 1 else args.cores
    state_dir = _state_dir(args)
    cluster = NetnsCluster(
        state_dir,
        nodes=args.netns,
        cores=cores,
        memory=args.memory,
        prefix=args.prefix,
        subnet=args.subnet,
        rate=args.rate,
        delay=args.delay,
    ).start()
    print(
        f"{cluster.url}: {len(cluster.nodes)} node(s) on bridge {cluster.bridge}; "
        f"state in {state_dir}"
    )
    for node in cluster.nodes:
        print(f"  {node.name:<14} {node.address:<15} {node.cores} core(s)")
    print(
        f"use: SPARK_LOCAL_IP={cluster.bridge_address} spark-mpi run --master {cluster.url} "
        "--np 2 script.py"
    )
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.standalone import StandaloneCluster

    if args.netns:
        return _start_netns(args)
    if len(args.cores) != 1:
        raise ValueError("--cores takes one number without --netns")
    args.state_dir = _state_dir(args)
    cluster = StandaloneCluster(
        args.state_dir,
        workers=args.workers,
        cores=args.cores[0],
        memory=args.memory,
        host=args.host,
    ).start()
    print(
        f"{cluster.url}: {args.workers} worker(s) x {args.cores[0]} core(s); "
        f"state in {args.state_dir}"
    )
    print(
        f"use: spark-mpi run --master {cluster.url} ...  or  --master {cluster.url} in spark-submit"
    )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.netns import NetnsCluster, NetnsError
    from sparkmpi.deploy.standalone import StandaloneCluster

    state_dir = _state_dir(args)
    if args.netns:
        try:
            cluster = NetnsCluster.load(state_dir)
        except NetnsError:  # no state left: remove what the prefix names
            removed = NetnsCluster.cleanup(args.prefix)
            print(f"prefix {args.prefix}: removed {len(removed)} namespace(s) and link(s)")
            return 0
        cluster.stop()
        print(f"{cluster.url}: stopped; namespaces and links removed")
        return 0
    cluster = StandaloneCluster.load(state_dir)
    cluster.stop()
    print(f"{cluster.url}: stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.netns import NetnsCluster
    from sparkmpi.deploy.standalone import StandaloneCluster

    state_dir = _state_dir(args)
    if args.netns:
        netns = NetnsCluster.load(state_dir)
        alive = netns.alive_hosts()
        for node in netns.nodes:
            state = "worker alive" if node.address in alive else "no worker"
            print(f"  {node.name:<14} {node.address:<15} {node.cores} core(s)  {state}")
    cluster = StandaloneCluster.load(state_dir)
    if args.wait_workers:
        cluster.wait_for_workers(args.wait_workers, args.timeout)
    status = cluster.status()
    print(f"{status['url']}: {status['alive_workers']} worker(s) alive")
    for name, (pid, alive) in status["processes"].items():
        print(f"  {name:<8} pid {pid:<8} {'running' if alive else 'gone'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.standalone import spark_env, worker_command

    command = worker_command(args.master, args.cores, args.memory, args.host, args.work_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    os.execvpe(command[0], command, spark_env(args.host))  # the worker replaces this process


def cmd_slurm_script(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.slurm import sbatch_script
    from sparkmpi.files import atomic_output

    if not Path(args.app).is_file():
        raise FileNotFoundError(f"{args.app}: no such application file")
    text = sbatch_script(
        args.app,
        args.args,
        nodes=args.nodes,
        cores_per_node=args.cores_per_node,
        time_limit=args.time,
        partition=args.partition,
        memory=args.memory,
        output=args.job_output,
        master_address=args.master_address,
    )
    with atomic_output(args.output) as tmp:
        tmp.write_text(text)
    Path(args.output).chmod(0o755)
    print(f"wrote {args.output}; submit it with: spark-mpi slurm submit {args.output}")
    return 0


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.slurm import submit

    return submit(args.script, follow=not args.no_follow)


def add_commands(sub) -> None:
    """Registers ``cluster`` and ``slurm`` on the ``spark-mpi`` parser."""
    from sparkmpi.deploy.netns import DEFAULT_STATE as NETNS_STATE
    from sparkmpi.deploy.standalone import DEFAULT_STATE

    cluster = sub.add_parser("cluster", help="Spark standalone cluster: start, stop, status")
    cluster_sub = cluster.add_subparsers(dest="cluster", required=True)
    start = cluster_sub.add_parser("start", help="start a master and workers on this machine")
    start.add_argument("--workers", type=int, default=2, help="local workers (2)")
    start.add_argument(
        "--cores", type=_cores, default=[1], help="cores per worker (1); with --netns N,N,..."
    )
    start.add_argument("--memory", default="1g", help="memory per worker (1g)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    start.add_argument("--netns", type=int, metavar="N", help="N nodes in network namespaces")
    start.add_argument("--subnet", default="10.77.0.0/24", help="--netns: the nodes' subnet")
    start.add_argument("--rate", help="--netns: limit each node's link, e.g. 10gbit")
    start.add_argument("--delay", help="--netns: delay on each link, e.g. 0.1ms (needs netem)")
    start.set_defaults(func=cmd_start)
    for name, func, text in (
        ("stop", cmd_stop, "stop the cluster recorded in the state directory"),
        ("status", cmd_status, "URL, workers alive, processes"),
    ):
        command = cluster_sub.add_parser(name, help=text)
        command.add_argument("--netns", action="store_true", help="a namespace cluster")
        command.set_defaults(func=func)
    for command in (start, cluster_sub.choices["stop"], cluster_sub.choices["status"]):
        command.add_argument(
            "--state-dir", help=f"PIDs, logs, URL ({DEFAULT_STATE}; --netns: {NETNS_STATE})"
        )
        command.add_argument(
            "--prefix", default="smpi", help="--netns: names of namespaces and links (smpi)"
        )
    status = cluster_sub.choices["status"]
    status.add_argument("--wait-workers", type=int, default=0, help="wait until N are alive")
    status.add_argument("--timeout", type=duration, default=120.0, help="e.g. 2m (2m)")
    worker = cluster_sub.add_parser("worker", help="run one worker here, in the foreground")
    worker.add_argument("--master", required=True, help="spark://HOST:PORT")
    worker.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    worker.add_argument("--memory", default="2g")
    worker.add_argument("--host", help="address to bind (default: Spark's choice)")
    worker.add_argument("--work-dir", default=str(DEFAULT_STATE / "work"))
    worker.set_defaults(func=cmd_worker)

    slurm = sub.add_parser("slurm", help="SLURM: write and submit an sbatch script")
    slurm_sub = slurm.add_subparsers(dest="slurm", required=True)
    script = slurm_sub.add_parser("script", help="write an sbatch script running APP on Spark")
    script.add_argument("app", help="the PySpark / run_mpi program")
    script.add_argument("args", nargs="*", help="its arguments (after --)")
    script.add_argument("--nodes", type=int, default=1)
    script.add_argument("--cores-per-node", type=int, default=2)
    script.add_argument("--time", default="00:30:00", help="time limit (00:30:00)")
    script.add_argument("--partition")
    script.add_argument("--memory", default="2g", help="Spark worker memory per node (2g)")
    script.add_argument("--master-address", help="address of the first node (default: DNS)")
    script.add_argument("--job-output", default="spark-mpi-%j.out", help="sbatch --output")
    script.add_argument("--output", "-o", default="spark-mpi.sbatch", help="script to write")
    script.set_defaults(func=cmd_slurm_script)
    submit = slurm_sub.add_parser("submit", help="sbatch a script and follow the job")
    submit.add_argument("script")
    submit.add_argument("--no-follow", action="store_true", help="return after submitting")
    submit.set_defaults(func=cmd_slurm_submit)
