"""``spark-mpi ptycho simulate | reconstruct``."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_simulate(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.cxi import write_cxi
    from sparkmpi.apps.ptycho.simulate import simulate

    scan = simulate(
        args.frames,
        args.size,
        pattern=args.pattern,
        overlap=args.overlap,
        photons=args.photons,
        noise=args.noise,
        seed=args.seed,
    )
    write_cxi(scan, args.output)
    print(
        f"wrote {args.output}: {len(scan.intensities)} frames of {args.size}x{args.size}, "
        f"object {scan.object_shape()[0]}x{scan.object_shape()[1]}, {scan.source}"
    )
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from sparkmpi.apps.cuda import check_before_launch
    from sparkmpi.apps.ptycho.cxi import read_cxi, write_reconstruction
    from sparkmpi.apps.ptycho.figures import save_reconstruction_png
    from sparkmpi.apps.ptycho.pipeline import reconstruct
    from sparkmpi.apps.ptycho.solver import SolverSettings, phase_error
    from sparkmpi.files import atomic_outputs, check_output_path
    from sparkmpi.runner.context import spark_session
    from sparkmpi.runner.progress import IterationProgress

    settings = SolverSettings(
        args.algorithm,
        args.iterations,
        args.beta,
        None if args.probe_start < 0 else args.probe_start,
        args.backend,
        args.threads,
    )
    if Path(args.output).suffix.lower() not in (".h5", ".hdf5", ".cxi"):
        raise ValueError(f"{args.output}: the reconstruction is written as HDF5 (.h5)")
    png = Path(args.png) if args.png else Path(args.output).with_suffix(".png")
    check_output_path(args.output), check_output_path(png)  # before any work
    check_before_launch(settings.backend, args.master)
    scan = read_cxi(args.input)
    spark = spark_session(args.master, cores=args.ranks, app_name="spark-mpi ptycho")
    try:
        with IterationProgress(f"{settings.algorithm.upper()}", settings.iterations) as progress:
            rec, record = reconstruct(spark, scan, settings, ranks=args.ranks, output=progress)
    finally:
        spark.stop()
    if scan.truth_object is not None:
        lit = (rec.illumination > 0.5 * rec.illumination.max()).astype(float)
        record["phase_error_rad"] = phase_error(
            rec.object, scan.truth_object, lit, remove_ramp=settings.probe_start is not None
        )
    title = f"{settings.algorithm.upper()}, {record['frames']} frames, {args.ranks} ranks"
    with atomic_outputs(args.output, png) as (rec_tmp, png_tmp):  # both or neither
        write_reconstruction(rec_tmp, rec, record)
        save_reconstruction_png(rec, png_tmp, title)
    truth = (
        f", phase error {record['phase_error_rad']:.4f} rad" if "phase_error_rad" in record else ""
    )
    print(
        f"wrote {args.output} and {png}: {settings.iterations} iterations in "
        f"{record['solver_s']:.2f} s on {args.ranks} ranks ({record['seconds']:.1f} s end to "
        f"end), final error {record['final_error']:.2e}{truth}"
    )
    return 0


def add_commands(sub) -> None:
    """Registers ``ptycho`` and its subcommands on the ``spark-mpi`` parser."""
    ptycho = sub.add_parser("ptycho", help="ptychography: simulate, reconstruct")
    ptycho_sub = ptycho.add_subparsers(dest="ptycho", required=True)

    sim = ptycho_sub.add_parser("simulate", help="write a simulated scan as CXI")
    sim.add_argument("output", help="CXI file to write")
    sim.add_argument("--frames", type=int, default=512, help="diffraction frames (512)")
    sim.add_argument("--size", type=int, default=128, help="frame edge in pixels (128)")
    sim.add_argument("--pattern", choices=("spiral", "raster"), default="spiral")
    sim.add_argument("--overlap", type=float, default=0.7, help="probe overlap (0.7)")
    sim.add_argument("--photons", type=float, default=1e6, help="photons per frame (1e6)")
    sim.add_argument("--noise", action="store_true", help="Poisson-sample the intensities")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=cmd_simulate)

    rec = ptycho_sub.add_parser("reconstruct", help="reconstruct object and probe on Spark")
    rec.add_argument("input", help="CXI scan")
    rec.add_argument("output", help="HDF5 file for object, probe and errors")
    rec.add_argument("--png", help="picture of the result (default: OUTPUT with .png)")
    rec.add_argument("--algorithm", choices=("raar", "dm"), default="raar")
    rec.add_argument("--iterations", type=int, default=100)
    rec.add_argument("--beta", type=float, default=0.75, help="RAAR relaxation (0.75)")
    rec.add_argument(
        "--probe-start",
        type=int,
        default=10,
        help="refine the probe from this iteration; -1: never",
    )
    rec.add_argument("--backend", choices=("cpu", "numpy", "cupy"), default="cpu")
    rec.add_argument("--threads", type=int, default=1, help="FFT threads per rank (1)")
    rec.add_argument("--ranks", type=int, default=2, help="MPI ranks / partitions (2)")
    rec.add_argument("--master", help="Spark master URL (default local[RANKS])")
    rec.set_defaults(func=cmd_reconstruct)
