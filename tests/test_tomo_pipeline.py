"""The tomography pipeline end to end on Spark: simulated series, the real tooth scan, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ARTIFACTS
from helpers import spark_mpi
from sparkmpi.apps.tomo.algorithms import rmse
from sparkmpi.apps.tomo.io import TiltSeries, write_tiff_series
from sparkmpi.apps.tomo.parquet import write_parquet
from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series, tilt_angles
from sparkmpi.apps.tomo.pipeline import ReconSettings, reconstruct
from sparkmpi.apps.tomo.volume import read_volume

TOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "tooth.h5"


@pytest.fixture(scope="module")
def small_series(tmp_path_factory):
    phantom = blobs_phantom((12, 48, 48), n_blobs=8, seed=3)
    angles = tilt_angles()
    series = TiltSeries(simulate_tilt_series(phantom, angles), angles, "test phantom")
    path = tmp_path_factory.mktemp("tomo") / "tilt.tif"
    write_tiff_series(path, series)
    return phantom, path


def test_both_engines_give_the_same_volume(spark, small_series, tmp_path):
    phantom, tif = small_series
    from sparkmpi.apps.tomo.io import read_series

    parquet = tmp_path / "tilt.parquet"
    write_parquet(read_series(tif), parquet)
    settings = ReconSettings("art", iterations=3, beta=0.5)
    by_mpi, record = reconstruct(spark, parquet, settings, ranks=2, engine="mpi")
    by_spark, _ = reconstruct(spark, parquet, settings, ranks=3, engine="spark")
    assert by_mpi.shape == phantom.shape == tuple(record["shape"])
    np.testing.assert_allclose(by_mpi, by_spark, rtol=1e-4, atol=1e-5)
    assert rmse(by_mpi, phantom) < rmse(np.zeros_like(phantom), phantom)


def test_tiff_to_parquet_to_vti_round_trip_through_the_command(small_series, tmp_path):
    phantom, tif = small_series
    parquet, vti = tmp_path / "tilt.parquet", tmp_path / "volume.vti"
    done = spark_mpi("tomo", "to-parquet", str(tif), str(parquet))
    assert done.returncode == 0, done.stderr[-2000:]
    done = spark_mpi(
        "tomo", "reconstruct", str(parquet), str(vti), "--iterations", "5", "--ranks", "2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0] iteration 5/5" in done.stdout
    volume = read_volume(vti)
    assert volume.shape == phantom.shape
    assert rmse(volume, phantom) < 0.6 * rmse(np.zeros_like(phantom), phantom)
    assert vti.with_suffix(".png").stat().st_size > 1000


@pytest.mark.skipif(not TOOTH.exists(), reason="shared tooth.h5 not present")
@pytest.mark.parametrize("algorithm", ["art", "fbp"])
def test_real_tooth_scan_end_to_end(tmp_path, algorithm):
    out = tmp_path / f"tooth-{algorithm}.h5"
    done = spark_mpi(
        "tomo",
        "reconstruct",
        str(TOOTH),
        str(out),
        "--algorithm",
        algorithm,
        "--binning",
        "4",
        "--iterations",
        "5",
        "--ranks",
        "2",
        *(["--filter", "hann"] if algorithm == "fbp" else []),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    volume = read_volume(out)
    assert volume.shape == (2, 160, 160)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(out.with_suffix(".png"), ARTIFACTS / f"tooth-{algorithm}.png")
    for image in volume:
        n = image.shape[0]
        yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
        radius = np.hypot(yy, xx)
        tooth = image[radius < 0.3 * n]
        background = image[(radius > 0.42 * n) & (radius < 0.48 * n)]
        # a bright object in the middle on a dark background
        assert np.percentile(tooth, 90) > 4 * max(np.percentile(np.abs(background), 90), 1e-3)


def test_bad_inputs_give_one_line_and_no_output(tmp_path):
    corrupt = tmp_path / "broken.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x13" * 200)
    out = tmp_path / "never.parquet"
    done = spark_mpi("tomo", "to-parquet", str(corrupt), str(out), timeout=120)
    assert done.returncode == 1 and not out.exists()
    assert done.stderr.count("\n") == 1 and "broken.tif" in done.stderr

    import h5py

    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["/exchange/data"] = np.ones((4, 2, 8), np.float32)
        f["/exchange/theta"] = np.arange(4.0)
    vol = tmp_path / "never.h5"
    done = spark_mpi("tomo", "reconstruct", str(partial), str(vol), timeout=120)
    assert done.returncode == 1 and not vol.exists()
    assert "data_white" in done.stderr and done.stderr.count("\n") == 1


def test_ranks_write_their_slabs_into_one_volume(tmp_path):
    import h5py

    from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series, tilt_angles
    from sparkmpi.viz.data import load

    angles = tilt_angles(72, 6)
    series = TiltSeries(simulate_tilt_series(blobs_phantom((10, 24, 24), 6), angles), angles)
    tif = tmp_path / "s.tif"
    write_tiff_series(tif, series)
    stored, gathered = tmp_path / "v.h5", tmp_path / "v.npy"
    for out in (stored, gathered):
        done = spark_mpi("tomo", "reconstruct", str(tif), str(out), "--algorithm", "fbp")
        assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(stored) as f:
        assert f["volume"].is_virtual and f["volume"].shape == (10, 24, 24)
        store = f["volume"][()]
    slabs = sorted(p.name for p in (tmp_path / "v.slabs").iterdir())
    assert slabs == ["slab-000000.h5", "slab-000005.h5"]  # one per rank, nothing else
    np.testing.assert_array_equal(store, np.load(gathered))
    assert load(str(stored)).volume.shape == (10, 24, 24)  # spark-mpi view reads it
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("v.h5", "v.slabs"):
        shutil.move(tmp_path / name, moved / name)
    with h5py.File(moved / "v.h5") as f:  # slab paths are relative: the pair moves together
        np.testing.assert_array_equal(f["volume"][()], store)
