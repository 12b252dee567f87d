"""Bad inputs and outputs of the app commands are caught before any work: one line naming the
file, exit status 1, nothing written; a result set (data + PNG) is written whole or not at all."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from helpers import spark_mpi
from sparkmpi.apps.ptycho.cxi import write_cxi
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.tomo.io import TiltSeries, TomoInputError
from sparkmpi.apps.tomo.phantom import tilt_angles
from sparkmpi.apps.tomo.tiff import read_tiff_series, write_tiff_series
from sparkmpi.apps.tomo.volume import save_orthoslices_png, write_volume
from sparkmpi.files import InputFileError, atomic_outputs, check_output_path


def one_line_failure(done, *names: str) -> None:
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    for name in names:
        assert name in done.stderr, done.stderr


@pytest.fixture
def series_tif(tmp_path):
    path = tmp_path / "series.tif"
    series = TiltSeries(np.random.default_rng(0).random((16, 4, 8), np.float32), tilt_angles(60, 8))
    write_tiff_series(path, series)
    return path


def test_tilt_angles_never_pass_the_maximum():
    assert list(tilt_angles(73, 10)) == list(np.arange(-70.0, 71.0, 10.0))
    default = tilt_angles()
    assert len(default) == 74 and default[0] == -73 and default[-1] == 73
    assert list(tilt_angles(0, 2)) == [0.0]


def test_a_truncated_tiff_is_refused_not_shortened(series_tif, tmp_path):
    data = series_tif.read_bytes()
    truncated = tmp_path / "truncated.tif"
    for cut in (len(data) // 2, len(data) - 100):  # pages lost, or the IFD chain broken
        truncated.write_bytes(data[:cut])
        with pytest.raises(TomoInputError, match=r"truncated\.tif: (damaged|not a readable) TIFF"):
            read_tiff_series(truncated, tilt_angles(60, 8))
    out = tmp_path / "never.h5"
    done = spark_mpi("tomo", "reconstruct", str(truncated), str(out), "--angles", "0")
    one_line_failure(done, "truncated.tif", "TIFF")
    assert not out.exists()


def test_outputs_are_checked_before_any_work(series_tif, tmp_path):
    (tmp_path / "adir.h5").mkdir()
    (tmp_path / "afile").write_text("x")
    for output, why in (
        (tmp_path / "adir.h5", "is a directory"),
        (tmp_path / "afile" / "vol.h5", "is not a directory"),
    ):
        done = spark_mpi("tomo", "reconstruct", str(series_tif), str(output), timeout=60)
        one_line_failure(done, str(output), why)
        assert "Spark" not in done.stderr  # refused before Spark started
    with pytest.raises(InputFileError, match="is a directory"):
        check_output_path(tmp_path / "adir.h5")
    assert check_output_path(tmp_path / "new" / "deeper" / "vol.h5").name == "vol.h5"


def test_a_result_set_is_written_whole_or_not_at_all(tmp_path):
    volume = np.random.default_rng(1).random((4, 8, 8), np.float32)
    vol, png = tmp_path / "vol.h5", tmp_path / "vol.png"
    with pytest.raises(ValueError, match="non-empty"), atomic_outputs(vol, png) as (v, p):
        write_volume(volume, v)
        save_orthoslices_png(volume[:0], p)  # the PNG fails after the volume was written
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with atomic_outputs(vol, png) as (vol_tmp, png_tmp):
        write_volume(volume, vol_tmp)
        save_orthoslices_png(volume, png_tmp, title="FBP of scan$1$.tif")  # not mathtext
    assert vol.exists() and png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.h5", "vol.png"]


@pytest.mark.parametrize("damage", ["energy-array", "frames-group"])
def test_cxi_entries_of_the_wrong_kind_give_one_line(tmp_path, damage):
    path = tmp_path / "scan.cxi"
    write_cxi(simulate(8, 32), path)
    with h5py.File(path, "r+") as f:
        if damage == "energy-array":
            del f["/entry_1/instrument_1/source_1/energy"]
            f["/entry_1/instrument_1/source_1/energy"] = np.ones(3)
            why = "source_1/energy has shape (3,), expected a number"
        else:
            del f["/entry_1/instrument_1/detector_1/data"]
            f.create_group("/entry_1/instrument_1/detector_1/data")
            why = "detector_1/data is a group, not a dataset"
    out = tmp_path / "rec.h5"
    done = spark_mpi("ptycho", "reconstruct", str(path), str(out), timeout=120)
    one_line_failure(done, "scan.cxi", why)
    assert not out.exists()


def test_parquet_slices_are_checked_before_the_ranks_start(series_tif, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparkmpi.apps.tomo.parquet import write_parquet

    good = tmp_path / "good.parquet"
    write_parquet(read_tiff_series(series_tif), good)
    table = pq.read_table(good)
    short = pa.array(
        [
            blob[:-4] if i == 2 else blob
            for i, blob in enumerate(table.column("sinogram").to_pylist())
        ],
        pa.binary(),
    )
    damaged = {
        "blobs.parquet": (table.set_column(1, table.schema.field(1), short), "slice 2's sinogram"),
        "nocolumn.parquet": (table.rename_columns(["slice", "data"]), "no column 'sinogram'"),
        "rows.parquet": (table.slice(0, 3), "3 rows do not hold each of slices 0..3 once"),
    }
    for name, (bad, why) in damaged.items():
        path = tmp_path / name
        pq.write_table(bad.replace_schema_metadata(table.schema.metadata), path)
        out = tmp_path / f"{name}.h5"
        done = spark_mpi("tomo", "reconstruct", str(path), str(out), timeout=180)
        last = done.stderr.strip().splitlines()[-1]  # after Spark's start-up lines
        assert done.returncode == 1 and last.startswith("spark-mpi tomo reconstruct: ")
        assert name in last and why in last, done.stderr
        assert not out.exists() and "Traceback" not in done.stderr
