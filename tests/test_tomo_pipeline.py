"""The tomography pipeline end to end on Spark: simulated series, the real tooth scan, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ARTIFACTS
from helpers import spark_mpi
from sparkmpi.apps.tomo.algorithms import rmse
from sparkmpi.apps.tomo.io import TiltSeries
from sparkmpi.apps.tomo.parquet import write_parquet
from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series, tilt_angles
from sparkmpi.apps.tomo.pipeline import ReconSettings, reconstruct
from sparkmpi.apps.tomo.tiff import write_tiff_series
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
    stored, gathered, by_tasks = tmp_path / "v.h5", tmp_path / "v.npy", tmp_path / "t.h5"
    for out, engine in ((stored, "mpi"), (gathered, "mpi"), (by_tasks, "spark")):
        done = spark_mpi(
            "tomo", "reconstruct", str(tif), str(out), "--algorithm", "fbp", "--engine", engine
        )
        assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(stored) as f:
        assert f["volume"].is_virtual and f["volume"].shape == (10, 24, 24)
        store = f["volume"][()]
        record = json.loads(f["volume"].attrs["metadata"])
    assert record["driver_peak_rss_mib"] > 0 and record["rank_peak_rss_mib"] > 0
    slabs = sorted(p.name for p in (tmp_path / "v.slabs").iterdir())
    assert slabs == ["slab-000000.h5", "slab-000005.h5"]  # one per rank, nothing else
    np.testing.assert_array_equal(store, np.load(gathered))
    with h5py.File(by_tasks) as f:  # plain Spark tasks write the same slabs
        np.testing.assert_array_equal(f["volume"][()], store)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work left
    assert load(str(stored)).volume.shape == (10, 24, 24)  # spark-mpi view reads it
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("v.h5", "v.slabs"):
        shutil.move(tmp_path / name, moved / name)
    with h5py.File(moved / "v.h5") as f:  # slab paths are relative: the pair moves together
        np.testing.assert_array_equal(f["volume"][()], store)


def test_fbp_streams_a_partition_through_its_slab_a_chunk_at_a_time(tmp_path, monkeypatch):
    import h5py

    from sparkmpi.apps.tomo import pipeline
    from sparkmpi.apps.tomo.algorithms import fbp
    from sparkmpi.apps.tomo.parquet import _FLOAT32_LE
    from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series

    angles = np.arange(0, 180, 4.0)
    projections = simulate_tilt_series(blobs_phantom((7, 16, 16), 4), angles)
    meta = {"angles_deg": list(angles), "n_angles": 45, "n_rows": 7, "n_cols": 16}
    rows = [(3 + r, projections[:, r].astype(_FLOAT32_LE).tobytes()) for r in range(7)]
    settings = pipeline.ReconSettings("fbp")
    per_slice = 4 * (45 * 16 + 2 * 16 * 16)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 3 * per_slice)
    assert pipeline.chunk_slices(meta, settings) == 3
    assert pipeline.chunk_slices(meta, pipeline.ReconSettings("art")) is None  # whole slab
    chunks = []
    written = pipeline.reconstruct_partition(
        meta, settings, str(tmp_path), rows, progress=lambda *_: chunks.append(1)
    )
    assert written == (3, 7)
    with h5py.File(tmp_path / "slab-000003.h5") as f:
        slab = f["volume"][()]
    expected = fbp(np.ascontiguousarray(projections.transpose(1, 0, 2)), angles, 16)
    np.testing.assert_allclose(slab, expected, rtol=1e-5, atol=1e-6)
    assert pipeline.reconstruct_partition(meta, settings, str(tmp_path), []) is None
    with pytest.raises(RuntimeError, match="slice 6 follows slice 4"):
        pipeline.reconstruct_partition(meta, settings, str(tmp_path), rows[:2] + rows[3:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slab-000003.h5"]  # no half slab


@pytest.mark.parametrize("kind", ["tiff", "deflate-tiff", "dxchange"])
def test_spark_tasks_convert_a_file_to_parquet_parts(spark, tmp_path, kind):
    import h5py
    import tifffile

    from sparkmpi.apps.tomo.io import read_series
    from sparkmpi.apps.tomo.parquet import convert_to_parquet, read_parquet

    rng = np.random.default_rng(3)
    angles = np.linspace(-60, 60, 9)
    if kind == "dxchange":
        source = tmp_path / "scan.h5"
        with h5py.File(source, "w") as f:
            f["/exchange/data"] = rng.integers(100, 900, (9, 11, 6), dtype=np.uint16)
            f["/exchange/data_white"] = np.full((2, 11, 6), 1000, np.uint16)
            f["/exchange/data_dark"] = np.zeros((11, 6), np.uint16)
            f["/exchange/theta"] = angles
    else:
        source = tmp_path / "tilt.tif"
        compression = "deflate" if kind == "deflate-tiff" else None
        tifffile.imwrite(source, rng.random((9, 11, 6), np.float32), compression=compression)
        source.with_suffix(".rawtlt").write_text("\n".join(map(str, angles)))
    output = tmp_path / "out.parquet"
    output.mkdir()  # an older conversion: replaced whole
    (output / "part-stale.parquet").write_text("old")
    meta = convert_to_parquet(spark, source, output, partitions=3)
    assert meta["n_rows"] == 11 and meta["angles_deg"] == list(angles)
    parts = sorted(p.name for p in output.iterdir())
    assert parts == ["part-000000.parquet", "part-000004.parquet", "part-000007.parquet"]
    whole = read_series(source)
    np.testing.assert_array_equal(read_parquet(output).projections, whole.projections)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_page_that_fails_to_decode_in_a_task_is_one_line(tmp_path):
    import tifffile

    source = tmp_path / "garbled.tif"
    pages = np.random.default_rng(5).random((6, 16, 16), np.float32)
    tifffile.imwrite(source, pages, compression="deflate")
    source.with_suffix(".rawtlt").write_text("\n".join(str(a) for a in range(6)))
    with tifffile.TiffFile(source) as tif:  # headers intact, page 4's compressed bytes garbled
        offset, count = tif.pages[4].dataoffsets[0], tif.pages[4].databytecounts[0]
    data = bytearray(source.read_bytes())
    data[offset : offset + count] = b"\x13" * count
    source.write_bytes(bytes(data))
    out = tmp_path / "never.parquet"
    done = spark_mpi("tomo", "to-parquet", str(source), str(out), timeout=180)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("spark-mpi tomo to-parquet: ") and "garbled.tif: damaged TIFF" in last
    assert "page 4" in last and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_conversion_refuses_non_finite_projections_and_writes_nothing(spark, tmp_path):
    import tifffile

    from sparkmpi.apps.tomo.io import TomoInputError
    from sparkmpi.apps.tomo.parquet import convert_to_parquet

    pages = np.ones((6, 10, 5), np.float32)
    pages[2, 7, 1] = np.nan
    source = tmp_path / "nan.tif"
    tifffile.imwrite(source, pages, photometric="minisblack")
    with pytest.raises(TomoInputError, match=r"nan\.tif: projections contain NaN .*rows 5\.\.9"):
        convert_to_parquet(spark, source, tmp_path / "out.parquet", [0, 30, 60, 90, 120, 150], 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.tif"]
