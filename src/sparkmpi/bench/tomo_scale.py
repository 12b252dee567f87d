"""``spark-mpi bench tomo --scale``: FBP end to end at synchrotron sizes against a library.

For each size n (256 and 512 by default) a tilt series of n detector rows x n columns from
360 projections over 180° is written as Parquet: the exact line integrals of a volume of
Gaussian blobs, so both reconstructions are compared on data no projector of either side
made. Then, timed:

- **spark-mpi**: ``spark-mpi tomo reconstruct data.parquet vol.h5 --algorithm fbp`` as a
  command of its own (Spark started, the ranks read their Parquet slices, filter and
  back-project a chunk at a time, write their slabs into the volume store, the PNG made from
  three slices). Wall time of the whole command; the peak RSS of the Python driver, of the
  JVM (in local mode the Spark driver and executors) and of the largest rank come from the
  run record stored with the volume.
- **the library**: ASTRA's CPU FBP (``astra-toolbox``; else scikit-image's ``iradon``) on
  ``--library-slices`` of the same sinograms, one process, timed per slice and scaled to all
  n slices on 2 cores as if the library used both perfectly. It reads nothing and writes
  nothing: the ratio favours the library.

The same slices of both are compared (relative RMS over the slice).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparkmpi.bench.report import print_table, pyplot_for, write_json

CORES = 2


def blob_sinograms(n: int, n_angles: int, rows: slice, seed: int = 0) -> np.ndarray:
    """Exact parallel-beam line integrals (n_angles, rows, n) of a volume of 3-D Gaussian
    blobs (the same for every call with one ``n`` and ``seed``), in the geometry of
    :mod:`sparkmpi.apps.tomo.projector` (rotation axis at (n - 1) / 2)."""
    rng = np.random.default_rng(seed)
    blobs = rng.uniform((-0.3, -0.3, -0.4, 0.01, 0.2), (0.3, 0.3, 0.4, 0.03, 1.0), (60, 5))
    theta = np.deg2rad(np.arange(n_angles) * 180.0 / n_angles)
    t = np.arange(n) - (n - 1) / 2
    z = np.arange(n)[rows] - (n - 1) / 2
    out = np.zeros((n_angles, len(z), n), dtype=np.float64)
    for x, y, zc, sigma, amplitude in blobs:
        x, y, zc, s = x * n, y * n, zc * n, sigma * n
        along = (t[None] - (x * np.cos(theta) + y * np.sin(theta))[:, None]) ** 2
        profile = np.sqrt(2 * np.pi) * s * np.exp(-along / (2 * s * s))  # (angles, t)
        out += amplitude * np.exp(-((z - zc) ** 2) / (2 * s * s))[None, :, None] * profile[:, None]
    return out.astype(np.float32)


def write_series(directory: Path, n: int, n_angles: int) -> Path:
    """The Parquet directory of :func:`blob_sinograms` for size ``n``, written in parts."""
    from sparkmpi.apps.tomo.parquet import tilt_metadata, write_part

    path = directory / f"blobs-{n}.parquet"
    meta = tilt_metadata((n_angles, n, n), np.arange(n_angles) * 180.0 / n_angles, "blobs")
    for first in range(0, n, 64):
        rows = slice(first, min(first + 64, n))
        sinograms = blob_sinograms(n, n_angles, rows)
        write_part(path / f"part-{first:06d}.parquet", meta, first, sinograms)
    return path


def library_fbp() -> tuple[str, object]:
    """(name, fbp(sinogram (angles, n), angles_deg) -> slice) of the library compared with."""
    try:
        import astra
    except ImportError:
        astra = None
    if astra is not None:

        def astra_fbp(sinogram: np.ndarray, angles_deg: np.ndarray, kernel: str = "strip"):
            n = sinogram.shape[1]
            volume = astra.create_vol_geom(n, n)
            # ASTRA's angles turn the other way round than ours; grids and centres agree
            geometry = astra.create_proj_geom("parallel", 1.0, n, -np.deg2rad(angles_deg))
            projector = astra.create_projector(kernel, geometry, volume)
            sino_id = astra.data2d.create("-sino", geometry, sinogram)
            rec_id = astra.data2d.create("-vol", volume)
            config = astra.astra_dict("FBP")
            config.update(
                ProjectorId=projector,
                ProjectionDataId=sino_id,
                ReconstructionDataId=rec_id,
                FilterType="Ram-Lak",
            )
            algorithm = astra.algorithm.create(config)
            try:
                astra.algorithm.run(algorithm)
                return astra.data2d.get(rec_id)
            finally:
                astra.algorithm.delete(algorithm)
                astra.data2d.delete([sino_id, rec_id])
                astra.projector.delete(projector)

        return f"ASTRA {astra.__version__} CPU FBP", astra_fbp
    try:
        from skimage.transform import iradon
    except ImportError:
        raise SystemExit(
            "bench tomo --scale needs astra-toolbox or scikit-image: pip install astra-toolbox"
        ) from None

    def skimage_fbp(sinogram: np.ndarray, angles_deg: np.ndarray, kernel: str = "linear"):
        return np.flipud(iradon(sinogram.T, theta=angles_deg, filter_name="ramp"))

    return "scikit-image iradon", skimage_fbp


def _run_ours(parquet: Path, volume: Path, n: int, ranks: int, master: str | None) -> dict:
    command = [sys.executable, "-m", "sparkmpi.cli", "tomo", "reconstruct", str(parquet)]
    command += [str(volume), "--algorithm", "fbp", "--center", str((n - 1) / 2)]
    command += ["--ranks", str(ranks)] + (["--master", master] if master else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"spark-mpi tomo reconstruct failed:\n{done.stderr[-3000:]}")
    import h5py

    with h5py.File(volume) as f:
        record = json.loads(f["volume"].attrs["metadata"])
    return {**record, "wall_s": wall}


def _relative_rms(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((estimate - reference) ** 2) / np.mean(reference**2)))


def measure(n: int, n_angles: int, library_slices: int, ranks: int, master, tmp: Path) -> dict:
    """One size: spark-mpi end to end, and the library on the same slices."""
    import h5py

    parquet = write_series(tmp, n, n_angles)
    volume = tmp / f"vol-{n}.h5"
    ours = _run_ours(parquet, volume, n, ranks, master)
    angles = np.arange(n_angles) * 180.0 / n_angles
    name, fbp = library_fbp()
    picks = np.linspace(n * 0.1, n * 0.9, library_slices).astype(int)
    sinograms = blob_sinograms(n, n_angles, slice(0, n))[:, picks]
    with h5py.File(volume) as f:
        ours_slices = f["volume"][np.sort(picks)]
    result = {"n": n, "projections": n_angles, "library": name, "slices_compared": picks.tolist()}
    for kernel in ("strip", "linear") if name.startswith("ASTRA") else ("linear",):
        fbp(sinograms[:, 0], angles, kernel)  # first call outside the timing
        start = time.perf_counter()
        theirs = np.stack([fbp(sinograms[:, i], angles, kernel) for i in range(len(picks))])
        per_slice = (time.perf_counter() - start) / len(picks)
        result[f"library_{kernel}"] = {
            "seconds_per_slice": per_slice,
            "seconds_all_slices_2_cores": per_slice * n / CORES,
            "relative_rms_vs_ours": _relative_rms(ours_slices, theirs),
        }
    result["ours"] = {
        "wall_s": ours["wall_s"],
        "pipeline_s": ours["seconds"],
        "reconstruction_s": ours["reconstruction_s"],
        "driver_peak_rss_mib": ours["driver_peak_rss_mib"],
        "jvm_peak_rss_mib": ours["jvm_peak_rss_mib"],
        "rank_peak_rss_mib": ours["rank_peak_rss_mib"],
        "ranks": ours["ranks"],
    }
    return result


def main(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="spark-mpi-bench-tomo-") as tmp:
        for n in sizes:
            print(f"size {n}: writing {n} sinograms of {args.projections} x {n}, then FBP ...")
            ranks = max(int(r) for r in args.ranks.split(","))
            settings = (args.projections, args.library_slices, ranks, args.master)
            results.append(measure(n, *settings, Path(tmp)))
    rows = []
    for r in results:
        ours = r["ours"]
        for kernel in ("strip", "linear"):
            lib = r.get(f"library_{kernel}")
            if lib:
                rows.append(
                    [
                        f"{r['n']}³, {r['library'].split()[0]} {kernel}",
                        ours["wall_s"],
                        lib["seconds_all_slices_2_cores"],
                        lib["seconds_all_slices_2_cores"] / ours["wall_s"],
                        lib["relative_rms_vs_ours"],
                        ours["driver_peak_rss_mib"],
                        ours["jvm_peak_rss_mib"],
                        ours["rank_peak_rss_mib"],
                    ]
                )
    print_table(
        f"FBP from {args.projections} projections, end to end",
        [
            "case",
            "spark-mpi s",
            "library s",
            "x faster",
            "rel. RMS",
            "driver MiB",
            "JVM MiB",
            "rank MiB",
        ],
        rows,
    )
    write_json(args.json, {"cores": CORES, "sizes": results})
    _plot(args.plot, results, args.projections)
    return 0


def _plot(path, results: list[dict], projections: int) -> None:
    """Seconds per size, grouped: spark-mpi end to end beside each library kernel."""
    plt = pyplot_for(path)
    if plt is None:
        return
    kernels = [k for k in ("strip", "linear") if f"library_{k}" in results[0]]
    series = [("spark-mpi, end to end", lambda r: r["ours"]["wall_s"])] + [
        (
            f"{results[0]['library'].split()[0]} {k}, compute only",
            lambda r, k=k: r[f"library_{k}"]["seconds_all_slices_2_cores"],
        )
        for k in kernels
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    width = 0.8 / len(series)
    for i, (label, value) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(results))]
        values = [value(r) for r in results]
        bars = ax.bar(xs, values, width, label=label)
        for bar, v in zip(bars, values, strict=True):
            x = bar.get_x() + bar.get_width() / 2
            ax.annotate(f"{v:.1f} s", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), [f"{r['n']}³" for r in results])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (one run, log scale)")
    ax.set_title(f"FBP from {projections} projections on 2 cores")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
