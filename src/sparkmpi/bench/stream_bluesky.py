"""``spark-mpi bench stream-bluesky``: a ptychography scan reconstructed from Bluesky run
documents, against the same scan replayed from its CXI file (the goal: the same final phase
error, |bluesky - cxi| / cxi ≤ 1e-3, for 256 frames of 128²).

A scan is simulated (fixed seed) and written as a CXI file; both sides read that file:

- **CXI**: its frames in the project's own records over ZeroMQ (``zmq://``), as
  ``spark-mpi stream produce --scan scan.cxi`` sends them;
- **Bluesky**: a real ``RunEngine`` runs a ``list_scan`` of two ``ophyd.sim`` motors over the
  file's positions (0.01 motor units per object pixel) with a detector whose inline image is
  the file's frame at the motors' position; ``bluesky_kafka.Publisher`` publishes the documents
  into a Tansu broker, the driver follows ``bluesky+kafka://``.

Both are reconstructed by a ``StreamDriver`` (app ptycho) with the same settings, from a cold
MPI session each; the final object's phase error against the simulated truth is measured as in
the tests (lit area, ramp removed).

What the comparison includes: the solver is iterative and a frame's exit wave starts from the
object of the batch it arrives in, so two runs whose batches split the frames differently end
slightly differently. By default each side's whole scan is produced (every document published,
every record sent) once its driver is listening and before it runs the scan, so the first batch
(taken after the MPI session has started) holds every frame: both sides run the same iterations
on the same frames in the same order, and the phase errors differ only by what the two paths
do to the data (positions through motor units, probe through JSON, frames through
msgpack-numpy). That is checked, not assumed: ``batch_frames`` per run and ``same_batching`` in
the JSON. ``--live`` instead produces as fast as possible while the driver follows: batches
split by timing (the RunEngine takes seconds, the ZeroMQ replay milliseconds), and as the
noise-free solver is still converging after the final iterations, the errors then differ by
10-20 % (at 256 frames of 128², with 60 or 300 final iterations). Wall times run
from the first document or record produced to the final result being durable (the MPI
session's start included; Spark's first job runs before both, so neither pays for it);
``after_produce_s`` is the part after the last one was produced.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable

UNITS_PER_PIXEL = 0.01  # motor units (mm) per object pixel
GOAL = 1e-3  # |bluesky - cxi| / cxi


def sparkmpi_metadata(scan, units_per_pixel: float = UNITS_PER_PIXEL) -> dict:
    """The start document's ``sparkmpi`` block (docs/streaming-bluesky.md) for ``scan``:
    motors ``sy``, ``sx``, its geometry and its initial probe as rows of [re, im] pairs."""
    import numpy as np

    geometry = {
        "energy_ev": scan.energy_ev,
        "distance_m": scan.distance_m,
        "pixel_size_m": scan.pixel_size_m,
    }
    return {
        "app": "ptycho",
        "position_fields": ["sy", "sx"],
        "units_per_pixel": units_per_pixel,
        "geometry": geometry,
        "probe": np.stack([scan.probe.real, scan.probe.imag], axis=-1).tolist(),
    }


def run_bluesky_scan(
    scan,
    publish: Callable[[str, dict], None],
    units_per_pixel: float = UNITS_PER_PIXEL,
    files: str | os.PathLike | None = None,
) -> str:
    """Runs a real RunEngine ``list_scan`` of ophyd.sim motors ``sy``, ``sx`` over ``scan``'s
    positions (times ``units_per_pixel``) with a detector ``img`` whose image is the frame at
    the motors' position (event ``seq_num`` i+1 carries frame i): inline, or with ``files`` in
    the NPY_SEQ files ophyd writes there. Every document goes to ``publish``. Returns the start
    document's uid."""
    import numpy as np
    from bluesky import RunEngine
    from bluesky.plans import list_scan
    from ophyd.sim import SynAxis, SynSignal, SynSignalWithRegistry

    sy, sx = SynAxis(name="sy"), SynAxis(name="sx")
    planned = scan.positions * units_per_pixel

    def image():
        here = np.array([sy.position, sx.position])
        return scan.intensities[int(np.argmin(np.abs(planned - here).sum(axis=1)))]

    if files is None:
        det = SynSignal(func=image, name="img")
    else:
        det = SynSignalWithRegistry(func=image, name="img", save_path=str(files))
    engine = RunEngine({}, context_managers=[])
    engine.subscribe(publish)
    md = {"sparkmpi": sparkmpi_metadata(scan, units_per_pixel)}
    plan = list_scan([det], sy, list(planned[:, 0]), sx, list(planned[:, 1]), md=md)
    (uid,) = engine(plan)
    return uid


def bluesky_publisher(bootstrap: str, topic: str):
    """A ``bluesky_kafka.Publisher`` to ``topic`` (key ``beamline``, msgpack-numpy), flushed at
    each stop document."""
    from bluesky_kafka import Publisher

    config = {"acks": 1, "log_level": 0}
    return Publisher(
        topic, bootstrap, key="beamline", producer_config=config, flush_on_stop_doc=True
    )


def reconstruct(
    spark, url: str, out: str, settings, produce: Callable[[], None], live: bool
) -> tuple[dict, list[dict], dict, dict]:
    """Reconstructs the scan ``produce()`` sends to ``url``: produced completely before the
    driver's first batch, or (``live``) while the driver follows. Returns the final summary,
    the batch history, the final object and illumination, and the times (s): ``wall_s`` (from
    producing to the final result durable), ``produce_s``, ``after_produce_s``."""
    import h5py

    from sparkmpi.streaming.driver import StreamDriver

    with StreamDriver(spark, url, out, settings, log=lambda line: None) as driver:
        began = time.perf_counter()
        if live:
            result: dict = {}
            runner = threading.Thread(target=lambda: result.update(s=driver.run_scan(600)))
            runner.start()
            produce()
            produced = time.perf_counter()
            runner.join(900)
            summary = result.get("s")
        else:
            produce()
            produced = time.perf_counter()
            summary = driver.run_scan(600)
        wall = time.perf_counter() - began
        history = list(driver.history)
    if summary is None:
        raise RuntimeError(f"{url}: no scan was reconstructed")
    with h5py.File(summary["file"]) as f:
        arrays = {k: f[k][()] for k in ("object", "illumination")}
    produce_s = produced - began
    times = {"wall_s": wall, "produce_s": produce_s, "after_produce_s": wall - produce_s}
    return summary, history, arrays, times


def _figures(name: str, truth, summary, history, arrays, times) -> dict:
    from sparkmpi.apps.ptycho.solver import phase_error

    lit = arrays["illumination"] > 0.5 * arrays["illumination"].max()
    error = phase_error(arrays["object"], truth, lit.astype(float), remove_ramp=True)
    return {
        "source": name,
        "phase_error_rad": error,
        "frames_used": summary["frames_used"],
        "frames_lost": summary["frames_lost"],
        "frames_applied_twice": summary["frames_applied_twice"],
        "malformed": summary["malformed"],
        "batch_frames": [b["new_frames"] for b in history if not b["final"]],
        "iterations": summary["iterations"],
        **times,
    }


def main(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.cxi import read_cxi, write_cxi
    from sparkmpi.apps.ptycho.simulate import simulate
    from sparkmpi.apps.ptycho.streaming import produce
    from sparkmpi.bench.report import bar_plot, print_table, write_json
    from sparkmpi.deploy.ports import free_port
    from sparkmpi.runner.context import spark_session
    from sparkmpi.streaming.broker import TansuBroker
    from sparkmpi.streaming.driver import StreamSettings

    if args.quick:
        args.frames, args.size = 32, 64
    settings = StreamSettings(args.batch_interval, args.iterations, args.final_iterations, 2)
    spark = spark_session(args.master, cores=2, app_name="spark-mpi bench stream-bluesky")
    runs = []
    try:
        spark.sparkContext.parallelize(range(2), 2).count()  # Spark's first job: in neither
        with TansuBroker() as broker, tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "scan.cxi")
            write_cxi(simulate(args.frames, args.size, seed=0), path)
            scan = read_cxi(path)  # both sides send what the file holds
            url = f"zmq://127.0.0.1:{free_port()}"
            cxi = reconstruct(
                spark,
                url,
                os.path.join(tmp, "cxi"),
                settings,
                lambda: produce(scan, url, 0.0, "cxi-bench"),
                args.live,
            )
            runs.append(_figures("cxi (zmq://)", scan.truth_object, *cxi))
            topic = "bench.bluesky.documents"
            pub = bluesky_publisher(broker.bootstrap, topic)
            bluesky = reconstruct(
                spark,
                f"bluesky+kafka://{broker.bootstrap}/{topic}",
                os.path.join(tmp, "bluesky"),
                settings,
                lambda: run_bluesky_scan(scan, pub),
                args.live,
            )
            runs.append(_figures("bluesky (bluesky+kafka://)", scan.truth_object, *bluesky))
    finally:
        spark.stop()
    c, b = runs[0]["phase_error_rad"], runs[1]["phase_error_rad"]
    relative = abs(b - c) / c
    result = {
        "frames": args.frames,
        "frame_size": args.size,
        "mode": "live" if args.live else "produced before the first batch",
        "settings": vars(settings),
        "runs": runs,
        "relative_difference": relative,
        "goal": f"|bluesky - cxi| / cxi <= {GOAL:g}",
        "goal_met": relative <= GOAL,
        "same_batching": runs[0]["batch_frames"] == runs[1]["batch_frames"],
    }
    print_table(
        f"{args.frames} frames of {args.size}², batches every {args.batch_interval:g} s, "
        f"{args.iterations} + {args.final_iterations} iterations, 2 ranks ({result['mode']})",
        ["source", "phase error rad", "used", "lost", "twice", "batches", "produce s", "wall s"],
        [
            [
                r["source"],
                f"{r['phase_error_rad']:.6f}",
                r["frames_used"],
                r["frames_lost"],
                r["frames_applied_twice"],
                str(r["batch_frames"]),
                r["produce_s"],
                r["wall_s"],
            ]
            for r in runs
        ],
    )
    met = "met" if result["goal_met"] else "NOT met"
    print(f"|bluesky - cxi| / cxi = {relative:.2e}: goal ≤ {GOAL:g} {met}")
    write_json(args.json, result)
    bar_plot(
        args.plot,
        f"{args.frames} frames of {args.size}², produced → final result",
        [f"{r['source'].split()[0]}: {what}" for what in ("total", "after last") for r in runs],
        [r[key] for key in ("wall_s", "after_produce_s") for r in runs],
    )
    return 0
