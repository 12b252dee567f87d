"""``python -m sparkmpi.bench.gpu`` (or ``spark-mpi bench gpu``): the solvers on one GPU,
without Spark, MPI or Java, against the same device's FFT bound and the CPU backend.

Ptychography: ``--frames`` of ``--size``², ``--iterations`` RAAR (or DM) iterations with
probe refinement, one rank. Timed: the iterations of a solver whose frames are already on
the device (kernels compiled and FFT plans made by an earlier solver in the same process,
whose whole first call is reported apart as ``first_call_s``), ending when the object is
back on the host. The bound is ``iterations`` x (forward + inverse) batched FFT of the whole
stack on the same device, in place: what any solver of this formulation pays. The phase
error is against the simulated object where the illumination exceeds half its maximum.

Tomography: one ART sweep and one SIRT iteration of the seed's case (``--tomo-size``³ from
74 projections over ±73°), matrix and sinograms already on the device; the CPU kernels'
times on the same machine, and the largest difference of the slices. With ``--fbp-size``:
FBP of that many slices from 360 projections, a chunk at a time from host memory, as a rank
of ``tomo reconstruct`` runs it, against the CPU kernel.

Only numpy, scipy, numba (and cupy for the GPU) are needed; the JSON records the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from sparkmpi.bench.report import bar_plot, print_table, write_json


def _sync(backend: str):
    if backend != "cupy":
        return lambda: None
    import cupy

    return cupy.cuda.Device().synchronize


def device_name(backend: str) -> str:
    """The GPU's name for ``cupy``, else the CPU model."""
    if backend == "cupy":
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    from sparkmpi.bench.report import _cpu_model

    return _cpu_model()


def fft_bound(backend: str, frames: int, n: int, iterations: int, threads: int) -> float:
    """Seconds for ``iterations`` x (forward + inverse) complex64 FFTs of the (frames, n, n)
    stack in place on ``backend``'s device."""
    if backend != "cupy":
        from sparkmpi.bench.ptycho import fft_bound as host_bound

        return min(host_bound(frames, n, iterations, threads, b) for b in (frames, 16 * threads))
    from sparkmpi.apps.ptycho.gpu import CupyOps

    ops = CupyOps()
    stack = ops.xp.ones((frames, n, n), dtype=np.complex64)
    ops.fft(stack, True)
    ops.fft(stack, False)
    sync = _sync(backend)
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        ops.fft(stack, True)
        ops.fft(stack, False)
    sync()
    return time.perf_counter() - start


def time_ptycho(scan, settings, threads: int = 1) -> dict:
    """First-call and timed seconds of ``settings`` on ``scan`` and the phase error."""
    from dataclasses import replace

    from sparkmpi.apps.ptycho.backends import warm_up
    from sparkmpi.apps.ptycho.scan import amplitudes
    from sparkmpi.apps.ptycho.solver import Solver, phase_error

    settings = replace(settings, threads=threads)
    amps, corners = amplitudes(scan.intensities), scan.pixel_positions()
    sync = _sync(settings.backend)
    start = time.perf_counter()
    warm_up(settings.backend, settings.algorithm)
    first = Solver(scan.object_shape(), scan.probe, settings)
    first.add_frames(amps, corners)
    first.iterate(1)
    first_call = time.perf_counter() - start
    del first
    solver = Solver(scan.object_shape(), scan.probe, settings)
    solver.add_frames(amps, corners)
    sync()
    start = time.perf_counter()
    rec = solver.iterate(settings.iterations)
    seconds = time.perf_counter() - start
    lit = (rec.illumination > 0.5 * rec.illumination.max()).astype(float)
    error = phase_error(rec.object, scan.truth_object, lit, remove_ramp=True)
    return {"seconds": seconds, "first_call_s": first_call, "phase_error_rad": error}


def time_tomo(backend: str, n: int) -> dict:
    """Seconds of one ART sweep and one SIRT iteration of the seed's case on ``backend`` (the
    second call of each, so matrix upload and kernel compilation are left out)."""
    from sparkmpi.apps.tomo.algorithms import art, sirt
    from sparkmpi.apps.tomo.phantom import blobs_phantom, tilt_angles
    from sparkmpi.apps.tomo.projector import project, system_matrix

    angles = tilt_angles()
    A = system_matrix(n, tuple(float(a) for a in angles), n)
    sinograms = project(blobs_phantom((n, n, n)), A)
    result: dict = {"shape": [n, n, n], "angles": len(angles)}
    for name, method in (("art", art), ("sirt", sirt)):
        slices = {}
        for where in dict.fromkeys((backend, "cpu")):
            method(sinograms, A, 1, backend=where)
            start = time.perf_counter()
            slices[where] = method(sinograms, A, 1, backend=where)
            result[f"{name}_{where}_s"] = time.perf_counter() - start
        scale = float(np.abs(slices["cpu"]).max()) or 1.0
        result[f"{name}_max_difference"] = float(
            np.abs(slices[backend] - slices["cpu"]).max() / scale
        )
    return result


def time_fbp(backend: str, n: int, projections: int = 360, chunk: int = 64) -> dict:
    """Seconds of FBP for ``n`` slices of ``n``² from ``projections`` over 180° (the
    analytic blob sinograms of ``bench tomo --scale``), ``chunk`` slices at a time as a rank
    does, host arrays in and out, on ``backend`` and on the CPU (its numba kernel, every
    core); the largest difference of the slices, relative to the largest value."""
    from sparkmpi.apps.tomo.algorithms import fbp
    from sparkmpi.bench.tomo_scale import blob_sinograms

    angles = np.arange(projections) * 180.0 / projections
    rows = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    stacks = [np.ascontiguousarray(blob_sinograms(n, projections, r).swapaxes(0, 1)) for r in rows]
    result: dict = {"shape": [n, n, n], "projections": projections, "chunk": chunk}
    slices = {}
    for where in dict.fromkeys((backend, "cpu")):
        fbp(stacks[0][:2], angles, backend=where)  # compile, plan, upload once
        sync = _sync(where)
        start = time.perf_counter()
        slices[where] = [fbp(stack, angles, backend=where) for stack in stacks]
        sync()
        result[f"fbp_{where}_s"] = time.perf_counter() - start
    scale = max(float(np.abs(s).max()) for s in slices["cpu"]) or 1.0
    result["fbp_max_difference"] = max(
        float(np.abs(a - b).max()) / scale
        for a, b in zip(slices[backend], slices["cpu"], strict=True)
    )
    return result


def main(args: argparse.Namespace) -> int:
    from sparkmpi.apps.cuda import GPUUnavailable, check_before_launch
    from sparkmpi.apps.ptycho.simulate import simulate
    from sparkmpi.apps.ptycho.solver import SolverSettings

    try:
        check_before_launch(args.backend, None)
    except GPUUnavailable as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return 1
    if args.quick:
        args.frames, args.size, args.iterations = 32, 32, 10
        args.tomo_size = min(args.tomo_size, 32)
        args.fbp_size = min(args.fbp_size, 32)
    threads = args.cpu_threads or os.cpu_count() or 1
    scan = simulate(args.frames, args.size)
    settings = SolverSettings(args.algorithm, args.iterations, backend=args.backend)
    gpu = time_ptycho(scan, settings)
    bound = fft_bound(args.backend, args.frames, args.size, args.iterations, threads)
    cpu = None
    if not args.skip_cpu:
        cpu = time_ptycho(scan, SolverSettings(args.algorithm, args.iterations), threads)
    tomo_backend = "cupy" if args.backend == "cupy" else "cpu"
    tomo = time_tomo(tomo_backend, args.tomo_size) if args.tomo_size else None
    if args.fbp_size:
        tomo = {**(tomo or {}), "fbp": time_fbp(tomo_backend, args.fbp_size)}
    result = {
        "backend": args.backend,
        "device": device_name(args.backend),
        "frames": args.frames,
        "frame_size": args.size,
        "iterations": args.iterations,
        "algorithm": args.algorithm,
        "probe_start": settings.probe_start,
        "ptycho": gpu,
        "fft_bound_s": bound,
        "ratio_to_fft_bound": gpu["seconds"] / bound,
        "cpu_backend": cpu,
        "cpu_threads": threads,
        "tomo": tomo,
    }
    rows = [
        [f"{args.backend}, {args.iterations} iterations", gpu["seconds"], gpu["phase_error_rad"]],
        [f"{args.backend}, first call (1 iteration)", gpu["first_call_s"], None],
        [f"FFT bound on {args.backend}", bound, None],
    ]
    if cpu:
        rows.append([f"cpu backend, {threads} threads", cpu["seconds"], cpu["phase_error_rad"]])
    print_table(
        f"{args.algorithm.upper()}: {args.frames} frames of {args.size}², on {result['device']}",
        ["what", "seconds", "phase error rad"],
        [[w, s, "" if e is None else e] for w, s, e in rows],
    )
    labels = ["FFT bound", args.backend] + (["cpu"] if cpu else [])
    values = [bound, gpu["seconds"]] + ([cpu["seconds"]] if cpu else [])
    if tomo:
        table = []
        for name in ("art", "sirt") if args.tomo_size else ():
            for where in dict.fromkeys((tomo_backend, "cpu")):
                table.append([f"{name.upper()} iteration, {where}", tomo[f"{name}_{where}_s"]])
                labels.append(f"{name.upper()} {where}")
                values.append(tomo[f"{name}_{where}_s"])
        for where in dict.fromkeys((tomo_backend, "cpu")) if args.fbp_size else ():
            n = args.fbp_size
            table.append([f"FBP {n}³ from 360 angles, {where}", tomo["fbp"][f"fbp_{where}_s"]])
            labels.append(f"FBP {n}³ {where}")
            values.append(tomo["fbp"][f"fbp_{where}_s"])
        print_table("Tomography", ["what", "seconds"], table)
    write_json(args.json, result)
    bar_plot(args.plot, f"Solvers on {result['device']}", labels, values)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, shared by ``spark-mpi bench gpu`` and ``python -m``."""
    parser.add_argument("--frames", type=int, default=512, help="diffraction frames (512)")
    parser.add_argument("--size", type=int, default=128, help="frame edge (128)")
    parser.add_argument("--iterations", type=int, default=100, help="solver iterations (100)")
    parser.add_argument("--algorithm", choices=("raar", "dm"), default="raar")
    parser.add_argument("--backend", choices=("cupy", "numpy", "cpu"), default="cupy")
    parser.add_argument("--cpu-threads", type=int, help="FFT threads of the cpu backend (all)")
    parser.add_argument("--skip-cpu", action="store_true", help="leave out the cpu backend")
    parser.add_argument("--tomo-size", type=int, default=256, help="volume edge; 0: no tomo")
    parser.add_argument("--fbp-size", type=int, default=0, help="FBP volume edge; 0: no FBP")
    parser.add_argument("--quick", action="store_true", help="a tiny case, to test the bench")
    parser.add_argument("--json", help="write the figures as JSON here")
    parser.add_argument("--plot", help="write a PNG plot here")
    return parser


if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(prog="python -m sparkmpi.bench.gpu"))
    raise SystemExit(main(parser.parse_args()))
