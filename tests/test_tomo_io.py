"""Tilt-series readers, the Parquet stage and volume files (fast; no Spark)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkmpi.apps.tomo.dxchange import read_dxchange
from sparkmpi.apps.tomo.io import TiltSeries, TomoInputError, read_series
from sparkmpi.apps.tomo.parquet import decode_sinogram, read_metadata, read_parquet, write_parquet
from sparkmpi.apps.tomo.tiff import read_tiff_series, write_tiff_series
from sparkmpi.apps.tomo.volume import read_volume, save_orthoslices_png, write_volume

TOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "tooth.h5"


def make_series(n_angles: int = 7, rows: int = 5, cols: int = 9, seed: int = 0) -> TiltSeries:
    rng = np.random.default_rng(seed)
    projections = rng.normal(3.0, 2.0, (n_angles, rows, cols)).astype(np.float32)
    return TiltSeries(projections, np.linspace(-60, 60, n_angles), "test series")


def no_leftovers(directory: Path) -> bool:
    return not any(p.name.startswith(".") and ".tmp-" in p.name for p in directory.iterdir())


def test_tiff_round_trip(tmp_path):
    series = make_series()
    path = tmp_path / "series.tif"
    write_tiff_series(path, series)
    back = read_tiff_series(path)
    lo, hi = series.projections.min(), series.projections.max()
    assert back.projections.dtype == np.float32
    assert back.projections.shape == series.projections.shape
    np.testing.assert_allclose(back.projections, series.projections, atol=(hi - lo) / 65535 * 1.01)
    np.testing.assert_array_equal(back.angles_deg, series.angles_deg)
    assert back.source == "test series"
    assert no_leftovers(tmp_path)


def test_tiff_constant_series(tmp_path):
    series = TiltSeries(np.full((3, 2, 4), 1.5, np.float32), [0.0, 1.0, 2.0], "flat")
    write_tiff_series(tmp_path / "flat.tif", series)
    np.testing.assert_array_equal(read_series(tmp_path / "flat.tif").projections, 1.5)


def plain_tiff(path: Path, n_angles: int = 4) -> None:
    import tifffile

    data = np.arange(n_angles * 3 * 5, dtype=np.uint16).reshape(n_angles, 3, 5)
    tifffile.imwrite(path, data, photometric="minisblack", metadata=None)


def test_angles_from_rawtlt_sidecar(tmp_path):
    path = tmp_path / "scan.tif"
    plain_tiff(path)
    (tmp_path / "scan.rawtlt").write_text("-30\n-10\n 10\n30\n\n")
    series = read_series(path)
    np.testing.assert_array_equal(series.angles_deg, [-30, -10, 10, 30])
    assert series.projections.shape == (4, 3, 5)
    assert series.projections[1, 0, 0] == 15


def test_angles_argument_wins(tmp_path):
    path = tmp_path / "scan.tif"
    plain_tiff(path)
    (tmp_path / "scan.rawtlt").write_text("1\n2\n3\n4\n")
    series = read_tiff_series(path, angles_deg=[0, 45, 90, 135])
    np.testing.assert_array_equal(series.angles_deg, [0, 45, 90, 135])


def test_wrong_angle_count(tmp_path):
    path = tmp_path / "scan.tif"
    plain_tiff(path)
    with pytest.raises(TomoInputError, match="4 projections but 3 tilt angles"):
        read_tiff_series(path, angles_deg=[0, 1, 2])


def test_missing_angles(tmp_path):
    path = tmp_path / "scan.tif"
    plain_tiff(path)
    with pytest.raises(TomoInputError, match=r"scan\.tif: no tilt angles.*\.rawtlt"):
        read_series(path)


def test_corrupt_tiff(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00" + b"\x13" * 200)
    with pytest.raises(TomoInputError) as info:
        read_series(path, angles_deg=[0.0])
    message = str(info.value)
    assert "broken.tif" in message
    assert "\n" not in message


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(TomoInputError, match=r"nothing\.tif: no such file"):
        read_series(tmp_path / "nothing.tif")
    with pytest.raises(TomoInputError, match=r"x\.foo: unknown tilt-series format"):
        read_series(tmp_path / "x.foo")


def test_tilt_series_validation():
    with pytest.raises(TomoInputError, match="3 projections but 2 tilt angles"):
        TiltSeries(np.zeros((3, 2, 2)), [0, 1], "s")
    with pytest.raises(TomoInputError, match="NaN"):
        TiltSeries(np.full((1, 2, 2), np.nan), [0], "s")
    with pytest.raises(TomoInputError, match="shape"):
        TiltSeries(np.zeros((3, 2)), [0, 1, 2], "s")
    sino = make_series().sinogram(2)
    assert sino.shape == (7, 9) and sino.dtype == np.float32 and sino.flags.c_contiguous


@pytest.mark.skipif(not TOOTH.exists(), reason="shared/data/tooth.h5 not present")
def test_read_dxchange_tooth():
    series = read_dxchange(TOOTH)
    assert series.projections.shape == (181, 2, 640)
    assert series.projections.dtype == np.float32
    assert np.isfinite(series.projections).all()
    assert series.angles_deg[0] == 0
    assert series.angles_deg[-1] == pytest.approx(179, abs=0.01)
    assert series.source == "tooth.h5"
    # the tooth attenuates: the middle of the detector sees far more than its edges
    sino = series.sinogram(0)
    assert sino[:, 300:340].mean() > sino[:, :40].mean() + 0.3
    assert sino.min() > -0.5 and sino.max() < 5


def write_dxchange(path: Path, *, skip: str = "") -> None:
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        datasets = {
            "data": rng.uniform(200, 900, (6, 2, 8)).astype(np.float32),
            "data_white": np.full((3, 2, 8), 1000, np.float32),
            "data_dark": np.full((2, 2, 8), 100, np.float32),
            "theta": np.linspace(0, 150, 6),
        }
        for name, data in datasets.items():
            if name != skip:
                f.create_dataset(f"exchange/{name}", data=data)


def test_read_dxchange_normalises(tmp_path):
    path = tmp_path / "scan.h5"
    write_dxchange(path)
    series = read_series(path)
    with h5py.File(path) as f:
        expected = -np.log((f["exchange/data"][...] - 100) / 900)
    np.testing.assert_allclose(series.projections, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(series.angles_deg, np.linspace(0, 150, 6))


def test_dxchange_missing_white(tmp_path):
    path = tmp_path / "partial.h5"
    write_dxchange(path, skip="data_white")
    with pytest.raises(TomoInputError, match=r"partial\.h5: missing dataset /exchange/data_white"):
        read_dxchange(path)


def test_dxchange_not_hdf5(tmp_path):
    path = tmp_path / "fake.h5"
    path.write_text("hello\nworld\n")
    with pytest.raises(TomoInputError, match=r"fake\.h5") as info:
        read_dxchange(path)
    assert "\n" not in str(info.value)


def test_parquet_round_trip(tmp_path):
    series = make_series(rows=37)
    path = tmp_path / "series.parquet"
    write_parquet(series, path)
    meta = read_metadata(path)
    assert meta == {
        "angles_deg": [float(a) for a in series.angles_deg],
        "n_angles": 7,
        "n_rows": 37,
        "n_cols": 9,
        "source": "test series",
    }
    back = read_parquet(path)
    np.testing.assert_array_equal(back.projections, series.projections)
    np.testing.assert_array_equal(back.angles_deg, series.angles_deg)
    table = pq.read_table(path)
    assert table.schema.field("slice").type == pa.int32()
    assert pq.ParquetFile(path).num_row_groups > 1
    row = table.slice(5, 1).to_pylist()[0]
    assert row["slice"] == 5
    sino = decode_sinogram(row["sinogram"], 7, 9)
    np.testing.assert_array_equal(sino, series.sinogram(5))
    sino[0, 0] = 1.0  # writable
    assert no_leftovers(tmp_path)


def test_decode_sinogram_wrong_length():
    with pytest.raises(ValueError, match="needs 24 bytes, got 20"):
        decode_sinogram(b"\x00" * 20, 2, 3)


def test_read_metadata_rejects_plain_parquet(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    with pytest.raises(TomoInputError, match=r"plain\.parquet: not a spark-mpi tilt series"):
        read_metadata(path)
    with pytest.raises(TomoInputError, match="no such file"):
        read_metadata(tmp_path / "absent.parquet")


def test_read_metadata_of_directory(tmp_path):
    series = make_series()
    write_parquet(series, tmp_path / "out.parquet" / "part-00000.parquet")
    assert read_metadata(tmp_path / "out.parquet")["n_rows"] == 5


@pytest.mark.parametrize("suffix", [".h5", ".npy", ".tif", ".vti"])
def test_volume_round_trip(tmp_path, suffix):
    volume = np.random.default_rng(2).normal(size=(3, 4, 5)).astype(np.float32)
    path = tmp_path / "sub" / f"volume{suffix}"
    write_volume(volume, path, spacing=(2.0, 1.0, 0.5), metadata={"a": np.float64(1.5)})
    back = read_volume(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, volume)
    assert no_leftovers(path.parent)


def test_vti_readable_by_vtk(tmp_path):
    volume = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    path = tmp_path / "volume.vti"
    write_volume(volume, path, spacing=(3.0, 2.0, 1.0))
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy

    reader = vtk.vtkXMLImageDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    assert image.GetDimensions() == (5, 4, 3)
    assert image.GetSpacing() == (1.0, 2.0, 3.0)
    values = vtk_to_numpy(image.GetPointData().GetArray("volume"))
    assert image.GetScalarComponentAsDouble(4, 1, 2, 0) == volume[2, 1, 4]
    np.testing.assert_array_equal(values.reshape(3, 4, 5), volume)


def test_unknown_volume_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"x\.foo: unknown volume format"):
        write_volume(np.zeros((2, 2, 2), np.float32), tmp_path / "x.foo")
    assert list(tmp_path.iterdir()) == []


class FailingStore:
    """A volume store whose read fails after its first 16 slices (a disk error halfway)."""

    shape = (40, 4, 4)

    def __getitem__(self, index):
        if index.start:
            raise OSError("disk error")
        return np.zeros((16, 4, 4), np.float32)


def test_failed_write_leaves_nothing(tmp_path):
    for name in ("v.npy", "v.tif", "v.h5"):  # written a chunk at a time, yet all or nothing
        with pytest.raises(OSError, match="disk error"):
            write_volume(FailingStore(), tmp_path / name)
    with pytest.raises((TypeError, ValueError)):
        write_volume(object(), tmp_path / "w.h5")
    assert list(tmp_path.iterdir()) == []


def test_failed_tiff_write_keeps_old_file(tmp_path, monkeypatch):
    import tifffile

    path = tmp_path / "series.tif"
    write_tiff_series(path, make_series())
    before = path.read_bytes()

    def broken_imwrite(file, *args, **kwargs):
        Path(file).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError):
        write_tiff_series(path, make_series(seed=3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["series.tif"]


@pytest.mark.parametrize("shape", [(2, 40, 40), (16, 32, 32)])
def test_orthoslices_png(tmp_path, shape):
    volume = np.random.default_rng(3).random(shape).astype(np.float32)
    path = tmp_path / "slices.png"
    save_orthoslices_png(volume, path, title="test")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert no_leftovers(tmp_path)


def test_read_slices_reads_a_range_in_order_from_interleaved_parts(tmp_path):
    import pyarrow as pa

    from sparkmpi.apps.tomo.parquet import _schema, read_slices, tilt_metadata

    meta = tilt_metadata((2, 10, 3), [0.0, 90.0], "interleaved")
    sinograms = {i: np.full((2, 3), i, "<f4").tobytes() for i in range(10)}
    path = tmp_path / "odd-even.parquet"
    path.mkdir()
    for parity in (0, 1):  # each part's one row group spans the other's slices
        rows = [i for i in range(10) if i % 2 == parity]
        table = pa.Table.from_arrays(
            [pa.array(rows, pa.int32()), pa.array([sinograms[i] for i in rows], pa.binary())],
            schema=_schema(meta),
        )
        pq.write_table(table, path / f"part-{parity}.parquet")
    got = list(read_slices(path, 2, 7))
    assert [number for number, _ in got] == [2, 3, 4, 5, 6]
    assert [bytes(blob) for _, blob in got] == [sinograms[i] for i in range(2, 7)]
    series = make_series()
    write_parquet(series, tmp_path / "plain.parquet")  # groups in order: read one at a time
    got = [decode_sinogram(b, 7, 9) for _, b in read_slices(tmp_path / "plain.parquet", 1, 3)]
    np.testing.assert_array_equal(np.stack(got), series.projections[:, 1:3].swapaxes(0, 1))
