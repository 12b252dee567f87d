"""The spark-mpi command, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import spark_mpi

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    a = np.full(4, comm.rank + 1.0)
    total = np.empty_like(a)
    comm.Allreduce(a, total)
    root_says = comm.bcast(sys.argv[1:] if comm.rank == 0 else None, root=0)
    gathered = comm.gather(comm.rank * 10, root=0)
    print("rank", comm.rank, "of", comm.size, "sum", int(total[0]), "args", root_says)
    if comm.rank == 0:
        print("gathered", gathered)
    """
)


def test_run_script_like_mpiexec(tmp_path):
    script = tmp_path / "hello_mpi.py"
    script.write_text(SCRIPT + "print('env', __import__('os').environ.get('BEAMLINE'))\n")
    done = spark_mpi(
        "run", "--ranks", "2", "--env", "BEAMLINE=8-ID", str(script), "alpha", "--beta"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "[rank 0] rank 0 of 2 sum 3 args ['alpha', '--beta']" in lines
    assert "[rank 1] rank 1 of 2 sum 3 args ['alpha', '--beta']" in lines
    assert "[rank 0] gathered [0, 10]" in lines
    assert "[rank 1] env 8-ID" in lines  # --env reaches every rank


def test_one_vocabulary_for_ranks_and_durations():
    from sparkmpi.cli import build_parser
    from sparkmpi.durations import duration

    parser = build_parser()
    for words in (["--ranks", "3"], ["--np", "3"], ["-n", "3"]):  # --np, -n as mpiexec's
        assert parser.parse_args(["run", *words, "x.py"]).ranks == 3
    assert parser.parse_args(["run", "--timeout", "2m", "x.py"]).timeout == 120
    assert parser.parse_args(["bench", "stream", "--batch-interval", "500ms"]).batch_interval == 0.5
    assert parser.parse_args(["bench", "tomo", "--workers", "1,2"]).ranks == "1,2"  # old name
    assert [duration(t) for t in ("2s", "500ms", "1.5", "1m")] == [2.0, 0.5, 1.5, 60.0]
    for bad in ("0s", "-1", "soon", "inf"):
        with pytest.raises(Exception, match="positive duration"):
            duration(bad)
    done = spark_mpi("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("spark-mpi "), done.stderr
    done = spark_mpi("run", "--env", "NOEQUALS", "x.py", timeout=60)
    assert done.returncode == 2 and "--env 'NOEQUALS': expected KEY=VALUE" in done.stderr


def test_failing_script_exits_nonzero_with_one_clear_error(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text(
        "from mpi4py import MPI\nif MPI.COMM_WORLD.rank == 1:\n    raise SystemExit(4)\n"
        "MPI.COMM_WORLD.Barrier()\n"
    )
    done = spark_mpi("run", "--np", "2", str(script))
    assert done.returncode == 1
    assert "spark-mpi run: MPI rank 1 of 2" in done.stderr
    assert "exited with status 4" in done.stderr


def test_missing_script(tmp_path):
    done = spark_mpi("run", "--np", "1", str(tmp_path / "nope.py"))
    assert done.returncode == 1
    assert "cannot read MPI script" in done.stderr


def test_info_lists_versions():
    done = spark_mpi("info", timeout=120)
    assert done.returncode == 0, done.stderr
    for key in ("Spark", "Java", "mpi4py", "MPI (mpich)", "PMI server"):
        assert key in done.stdout
    assert "MPICH Version" in done.stdout


@pytest.mark.parametrize("args", [["run"], ["bench"], ["nonsense"]])
def test_usage_errors(args):
    done = spark_mpi(*args, timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_prestarted_interpreters_die_with_spark(tmp_path):
    code = textwrap.dedent(
        """
        import time, psutil
        from sparkmpi import run_mpi
        from sparkmpi.runner.context import spark_session
        spark = spark_session(cores=2)
        run_mpi(spark, lambda comm, rows: [comm.rank], ranks=2, output=None).collect()
        time.sleep(2)
        spares = [p.pid for p in psutil.Process().children(recursive=True)
                  if p.name() == "sparkmpi-spare"]
        spark.stop()
        print("SPARES", spares)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    spares = eval(next(ln for ln in done.stdout.splitlines() if ln.startswith("SPARES"))[7:])
    assert spares, "a finished job should leave a spare in its worker"
    import time

    import psutil

    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(p) for p in spares) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in spares if psutil.pid_exists(p)]


def test_scripts_also_run_in_prestarted_interpreters(spark, tmp_path, captured):
    import time

    from sparkmpi import run_script

    script = tmp_path / "hello_mpi.py"
    script.write_text(SCRIPT + "\nprint('argv0', sys.argv[0])\n")
    for _ in range(2):
        run_script(spark, script, ["x"], ranks=2, output=captured)
        time.sleep(1.5)
    sums = [line for _, _, line in captured.lines if "sum 3 args ['x']" in line]
    assert len(sums) == 4
    assert (0, "stdout", f"argv0 {script}") in captured.lines


def test_readme_python_examples_run(tmp_path):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    assert blocks
    code = "\n".join(blocks) + "\nspark.stop()\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(16, 64, 64)" in done.stdout and (tmp_path / "volume.png").exists()
    assert "[(0, array([28., 28., 28.])), (1, array([28., 28., 28.]))]" in done.stdout
    assert "[0, 1, 2, 3]" in done.stdout
    assert "streamed 64 0 0" in done.stdout


def test_examples_run():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = spark_mpi("run", "--np", "2", str(root / "examples" / "hello_mpi.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 1] rank 1 of 2: Allreduce gave 3" in done.stdout
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "rdd_allreduce.py")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1: [4950. 4950. 4950.]" in done.stdout
    done = spark_mpi("run", "--np", "2", str(root / "examples" / "futures_executor.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0] squares [0, 1, 4, 9, 16, 25, 36, 49, 64, 81] computed on ranks [1]" in (
        done.stdout
    )
    done = spark_mpi("run", "--np", "1", str(root / "examples" / "futures_pool.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0] cubes [0, 1, 8, 27, 64, 125, 216, 343] from 2 spawned worker(s)" in (
        done.stdout
    )


def test_ctrl_c_on_the_driver_stops_the_ranks():
    code = textwrap.dedent(
        """
        import os, signal, threading, time, psutil
        from sparkmpi import run_mpi
        from sparkmpi.runner.context import spark_session
        spark = spark_session(cores=2)
        def spin(comm, rows):
            while True:
                comm.Barrier()
        threading.Timer(4, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            run_mpi(spark, spin, ranks=2, output=None)
        except KeyboardInterrupt:
            print("INTERRUPTED")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [
            p for p in psutil.Process().children(recursive=True) if p.name() == "sparkmpi-rank"
        ]:
            time.sleep(0.1)
        print("LEFT", [p.pid for p in psutil.Process().children(recursive=True)
                       if p.name() == "sparkmpi-rank"])
        spark.stop()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "INTERRUPTED" in done.stdout and "LEFT []" in done.stdout, done.stderr[-3000:]


def test_lazy_public_names_are_listed_and_typed():
    from pathlib import Path

    import sparkmpi
    import sparkmpi.runner

    assert set(sparkmpi.__all__) <= set(dir(sparkmpi))
    assert sorted(sparkmpi.runner._EXPORTS) == sparkmpi.runner.__all__
    assert set(sparkmpi.runner.__all__) <= set(dir(sparkmpi.runner))
    assert (Path(sparkmpi.__file__).parent / "py.typed").exists()  # PEP 561 marker
