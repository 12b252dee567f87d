"""``spark-mpi tomo simulate | to-parquet | reconstruct``."""

from __future__ import annotations

import argparse
import shutil
import uuid
from pathlib import Path


def _parse_angles(text: str | None):
    if not text:
        return None
    import numpy as np

    return np.array([float(a) for a in text.replace(",", " ").split()])


def cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from sparkmpi.apps.tomo.io import TiltSeries
    from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series, tilt_angles
    from sparkmpi.apps.tomo.tiff import write_tiff_series
    from sparkmpi.apps.tomo.volume import write_volume

    n = args.size
    volume = blobs_phantom((n, n, n), n_blobs=args.blobs, seed=args.seed)
    angles = tilt_angles(args.max_angle, args.step)
    projections = simulate_tilt_series(volume, angles)
    if args.noise > 0:
        rng = np.random.default_rng(args.seed)
        scale = args.noise * float(projections.std())
        projections = projections + rng.normal(0, scale, projections.shape).astype(np.float32)
    series = TiltSeries(projections.astype(np.float32), angles, f"phantom seed {args.seed}")
    write_tiff_series(args.output, series)
    if args.phantom:
        write_volume(volume, args.phantom)
    print(
        f"wrote {args.output}: {len(angles)} projections of {n}x{n} over "
        f"{angles[0]:+.0f}..{angles[-1]:+.0f} degrees"
    )
    return 0


def cmd_to_parquet(args: argparse.Namespace) -> int:
    from sparkmpi.apps.tomo.io import inspect_series
    from sparkmpi.apps.tomo.parquet import convert_to_parquet
    from sparkmpi.files import check_output_path
    from sparkmpi.runner.context import spark_session

    inspect_series(args.input, _parse_angles(args.angles))  # bad input: one line, no Spark
    check_output_path(args.output)
    spark = spark_session(args.master, cores=args.partitions, app_name="spark-mpi tomo")
    try:
        meta = convert_to_parquet(
            spark, args.input, args.output, _parse_angles(args.angles), args.partitions
        )
    finally:
        spark.stop()
    print(
        f"wrote {args.output}: {meta['n_rows']} slices, each a sinogram of "
        f"{meta['n_angles']} x {meta['n_cols']}"
    )
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from sparkmpi.apps.cuda import check_before_launch
    from sparkmpi.apps.tomo.io import inspect_series
    from sparkmpi.apps.tomo.parquet import convert_to_parquet
    from sparkmpi.apps.tomo.pipeline import ReconSettings, reconstruct_to_store
    from sparkmpi.apps.tomo.volume import FORMATS
    from sparkmpi.files import check_output_path
    from sparkmpi.runner.context import spark_session
    from sparkmpi.runner.progress import IterationProgress

    settings = ReconSettings(
        args.algorithm,
        args.iterations,
        args.beta,
        not args.no_positivity,
        args.center,
        args.binning,
        args.backend,
        args.filter,
    )
    if Path(args.output).suffix.lower() not in FORMATS:
        raise ValueError(
            f"{args.output}: unknown volume format (expected one of {', '.join(FORMATS)})"
        )
    png = Path(args.png) if args.png else Path(args.output).with_suffix(".png")
    check_output_path(args.output), check_output_path(png)  # before any work
    check_before_launch(settings.backend, args.master)
    parquet, output = Path(args.input), Path(args.output)
    if not _is_parquet(parquet):
        inspect_series(parquet, _parse_angles(args.angles))  # bad input: one line, no Spark
    # work files go beside the output, where a cluster's executors can reach them too
    work = output.parent / f".{output.name}.work-{uuid.uuid4().hex[:8]}"
    store = output if output.suffix.lower() in (".h5", ".hdf5") else work / "volume.h5"
    try:
        spark = spark_session(args.master, cores=args.ranks, app_name="spark-mpi tomo")
        try:
            if not _is_parquet(parquet):  # converted by Spark tasks, a range of rows each
                parquet = work / (parquet.stem + ".parquet")
                convert_to_parquet(spark, args.input, parquet, _parse_angles(args.angles))
            iterations = 1 if settings.algorithm == "fbp" else settings.iterations
            with IterationProgress(settings.algorithm.upper(), iterations) as progress:
                # the ranks write their slabs: neither data nor volume passes through here
                record = reconstruct_to_store(
                    spark,
                    parquet,
                    store,
                    settings,
                    ranks=args.ranks,
                    engine=args.engine,
                    output=progress,
                )
        finally:
            spark.stop()
        _publish(store, output, png, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"wrote {args.output} {tuple(record['shape'])} and {png} in {record['seconds']:.1f} s "
        f"({record['engine']}, {record['ranks']} ranks)"
    )
    return 0


def _is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet"


def _publish(store: Path, output: Path, png: Path, record: dict) -> None:
    """The result set from the volume store: the PNG from its three central slices and, for
    another format than HDF5, ``output`` written a chunk of slices at a time. Whole or
    absent: if anything fails, the store is removed too."""
    import h5py

    from sparkmpi.apps.tomo.volume import save_orthoslices_png, write_volume
    from sparkmpi.apps.tomo.volume_store import remove
    from sparkmpi.files import atomic_outputs

    title = f"{record['settings']['algorithm'].upper()} of {record['source']}"
    try:
        with h5py.File(store, "r") as f, atomic_outputs(png) as (png_tmp,):
            save_orthoslices_png(f["volume"], png_tmp, title=title)
            if store != output:
                write_volume(f["volume"], output, metadata=record)
    except BaseException:
        remove(store)
        raise


def add_commands(sub) -> None:
    """Registers ``tomo`` and its subcommands on the ``spark-mpi`` parser."""
    tomo = sub.add_parser("tomo", help="tomography: simulate, convert, reconstruct")
    tomo_sub = tomo.add_subparsers(dest="tomo", required=True)

    sim = tomo_sub.add_parser("simulate", help="write a TEM-like tilt series TIFF of a phantom")
    sim.add_argument("output", help="multi-page 16-bit TIFF to write")
    sim.add_argument("--size", type=int, default=256, help="phantom edge in voxels (256)")
    sim.add_argument("--max-angle", type=float, default=73.0, help="tilt range ± degrees (73)")
    sim.add_argument("--step", type=float, default=2.0, help="tilt step in degrees (2)")
    sim.add_argument("--blobs", type=int, default=40, help="nanoparticles in the phantom")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--noise", type=float, default=0.0, help="noise std, in projection stds")
    sim.add_argument("--phantom", help="also write the phantom volume here (.npy/.h5/.vti/.tif)")
    sim.set_defaults(func=cmd_simulate)

    conv = tomo_sub.add_parser(
        "to-parquet", help="TIFF or Data Exchange HDF5 → Parquet directory, on Spark tasks"
    )
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--angles", help="tilt angles in degrees, comma separated")
    conv.add_argument(
        "--partitions", type=int, default=2, help="Spark tasks, each a range of rows (2)"
    )
    conv.add_argument("--master", help="Spark master URL (default local[PARTITIONS])")
    conv.set_defaults(func=cmd_to_parquet)

    rec = tomo_sub.add_parser("reconstruct", help="reconstruct a volume on Spark")
    rec.add_argument("input", help=".parquet, TIFF tilt series or Data Exchange HDF5")
    rec.add_argument("output", help="volume to write: .h5, .npy, .tif or .vti")
    rec.add_argument("--png", help="three orthogonal slices (default: OUTPUT with .png)")
    rec.add_argument("--algorithm", choices=("art", "sirt", "fbp"), default="art")
    rec.add_argument(
        "--filter", choices=("ramlak", "shepp-logan", "hann"), default="ramlak", help="FBP's"
    )
    rec.add_argument("--iterations", type=int, default=10)
    rec.add_argument("--beta", type=float, default=0.5, help="ART relaxation (0.5)")
    rec.add_argument("--no-positivity", action="store_true")
    rec.add_argument("--center", type=float, help="rotation axis in detector bins after binning")
    rec.add_argument("--binning", type=int, default=1, help="average N detector bins (1)")
    rec.add_argument("--angles", help="tilt angles in degrees, comma separated")
    rec.add_argument("--ranks", type=int, default=2, help="partitions / MPI ranks (2)")
    rec.add_argument("--engine", choices=("mpi", "spark"), default="mpi")
    rec.add_argument(
        "--backend", choices=("cpu", "cupy"), default="cpu", help="cpu, or cupy: each rank on a GPU"
    )
    rec.add_argument("--master", help="Spark master URL (default local[RANKS])")
    rec.set_defaults(func=cmd_reconstruct)
