"""Ptychography: simulation, CXI files, the DM/RAAR solver alone and as MPI ranks in Spark."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import ARTIFACTS
from helpers import spark_mpi
from sparkmpi.apps.ptycho.cxi import PtychoInputError, read_cxi, read_reconstruction, write_cxi
from sparkmpi.apps.ptycho.pipeline import reconstruct
from sparkmpi.apps.ptycho.scan import amplitudes
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.ptycho.solver import SolverSettings, phase_error, solve


def solve_scan(scan, settings):
    return solve(
        amplitudes(scan.intensities),
        scan.pixel_positions(),
        scan.object_shape(),
        scan.probe,
        settings,
    )


def well_lit(rec) -> np.ndarray:
    return (rec.illumination > 0.5 * rec.illumination.max()).astype(float)


@pytest.fixture(scope="module")
def small_scan():
    return simulate(64, 64)


def test_noise_free_512_frames_reach_the_true_phase():
    scan = simulate(512, 128)
    assert scan.intensities.shape == (512, 128, 128)
    rec = solve_scan(scan, SolverSettings("raar", 100))
    assert phase_error(rec.object, scan.truth_object, well_lit(rec), remove_ramp=True) < 0.05
    errors = np.array(rec.errors)
    assert errors[-1] < errors[9] < errors[0] and errors[-1] < 1e-3 * errors[0]
    assert (np.diff(errors[10:]) <= 1e-9).mean() > 0.9  # falls nearly every iteration


def test_difference_map_without_probe_refinement_converges(small_scan):
    rec = solve_scan(small_scan, SolverSettings("dm", 60, probe_start=None))
    assert phase_error(rec.object, small_scan.truth_object, well_lit(rec)) < 0.05
    assert rec.errors[-1] < 0.5 * rec.errors[0]


def test_poisson_noise_still_gives_a_recognisable_object():
    scan = simulate(256, 64, photons=1e5, noise=True)
    assert not np.array_equal(scan.intensities, np.rint(scan.intensities) + 0.5)
    rec = solve_scan(scan, SolverSettings("raar", 60))
    lit = well_lit(rec)
    assert phase_error(rec.object, scan.truth_object, lit, remove_ramp=True) < 0.2
    truth_phase = np.angle(scan.truth_object)[lit > 0]
    estimate_phase = np.angle(rec.object)[lit > 0]
    assert np.corrcoef(truth_phase, estimate_phase)[0, 1] > 0.8


@pytest.mark.parametrize("algorithm", ["raar", "dm"])
def test_array_backend_computes_the_same_iterates(small_scan, algorithm):
    settings = dict(algorithm=algorithm, iterations=3, probe_start=1)
    fast = solve_scan(small_scan, SolverSettings(**settings, backend="cpu"))
    reference = solve_scan(small_scan, SolverSettings(**settings, backend="numpy"))
    lit = well_lit(fast) > 0
    np.testing.assert_allclose(fast.object[lit], reference.object[lit], atol=1e-3)
    np.testing.assert_allclose(fast.probe, reference.probe, atol=1e-3 * np.abs(fast.probe).max())
    np.testing.assert_allclose(fast.errors, reference.errors, rtol=1e-3)


def test_one_and_two_ranks_give_the_same_object(spark, small_scan):
    settings = SolverSettings("raar", 20)
    runs = [
        reconstruct(spark, small_scan, settings, ranks=r, output=lambda *a: None) for r in (1, 2)
    ]
    (one, record), (two, _) = runs
    lit = well_lit(one) > 0
    np.testing.assert_allclose(one.object[lit], two.object[lit], atol=1e-4)
    np.testing.assert_allclose(one.probe, two.probe, atol=1e-4 * np.abs(one.probe).max())
    np.testing.assert_allclose(one.errors, two.errors, rtol=1e-4)
    assert record["frames"] == 64 and record["solver_s"] > 0


def test_cxi_round_trip(tmp_path, small_scan):
    path = tmp_path / "scan.cxi"
    write_cxi(small_scan, path)
    back = read_cxi(path)
    np.testing.assert_array_equal(back.intensities, small_scan.intensities)
    np.testing.assert_allclose(back.positions, small_scan.positions, atol=1e-9)
    np.testing.assert_array_equal(back.probe, small_scan.probe)
    np.testing.assert_array_equal(back.truth_object, small_scan.truth_object)
    assert back.object_shape() == small_scan.object_shape()
    with h5py.File(path) as f:  # the layout SHARP reads
        assert f["/entry_1/data_1/data"].shape == (64, 64, 64)
        assert f["/entry_1/instrument_1/source_1/probe"].shape == (64, 64)
        assert f["/entry_1/sample_1/geometry_1/translation"].shape == (64, 3)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop /entry_1/instrument_1/detector_1/distance", "missing dataset"),
        ("short translations", "64 frames but translations of shape (10, 3)"),
        ("not hdf5", "not an HDF5/CXI file"),
    ],
)
def test_malformed_cxi_is_refused_in_one_line(tmp_path, small_scan, damage, message):
    path = tmp_path / "bad.cxi"
    write_cxi(small_scan, path)
    if damage.startswith("drop"):
        with h5py.File(path, "a") as f:
            del f[damage.split()[1]]
    elif damage == "short translations":
        with h5py.File(path, "a") as f:
            del f["/entry_1/sample_1/geometry_1/translation"]
            f["/entry_1/sample_1/geometry_1/translation"] = np.zeros((10, 3))
    else:
        path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(PtychoInputError, match=r"bad\.cxi") as caught:
        read_cxi(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_simulate_then_reconstruct_through_the_command(tmp_path):
    cxi, out = tmp_path / "scan.cxi", tmp_path / "rec.h5"
    done = spark_mpi("ptycho", "simulate", str(cxi), "--frames", "64", "--size", "64")
    assert done.returncode == 0, done.stderr[-2000:]
    done = spark_mpi(
        "ptycho", "reconstruct", str(cxi), str(out), "--iterations", "30", "--ranks", "2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0] iteration 30/30 error" in done.stdout
    result = read_reconstruction(out)
    assert result["errors"].shape == (30,) and result["record"]["ranks"] == 2
    assert result["record"]["phase_error_rad"] < 0.1
    png = out.with_suffix(".png")
    assert png.read_bytes().startswith(b"\x89PNG")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "ptycho-reconstruction.png").write_bytes(png.read_bytes())


def test_bad_scan_file_fails_the_command_in_one_line(tmp_path):
    bad, out = tmp_path / "broken.cxi", tmp_path / "never.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    done = spark_mpi("ptycho", "reconstruct", str(bad), str(out), timeout=120)
    assert done.returncode == 1 and not out.exists()
    assert done.stderr.count("\n") == 1 and "broken.cxi" in done.stderr


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_frames_added_later_leave_the_earlier_frames_raar_state_alone(small_scan, backend):
    from sparkmpi.apps.ptycho.solver import Solver

    amp, corners = amplitudes(small_scan.intensities), small_scan.pixel_positions()
    solver = Solver(small_scan.object_shape(), small_scan.probe, SolverSettings(backend=backend))
    solver.add_frames(amp[:32], corners[:32])
    solver.iterate(3)
    held = solver.backend
    before = (np.array(held.psi[:32]), np.array(held.w[:32]))
    solver.add_frames(amp[32:], corners[32:])  # a streaming batch
    assert not np.array_equal(before[0], before[1])  # w is RAAR's own state, not ψ
    np.testing.assert_array_equal(np.array(held.psi[:32]), before[0])
    np.testing.assert_array_equal(np.array(held.w[:32]), before[1])


def test_a_restored_solver_goes_on_where_the_result_was(small_scan):
    from sparkmpi.apps.ptycho.solver import Solver

    amp, corners = amplitudes(small_scan.intensities), small_scan.pixel_positions()
    first = Solver(small_scan.object_shape(), small_scan.probe)
    first.add_frames(amp, corners)
    done = first.iterate(30)
    again = Solver(small_scan.object_shape(), small_scan.probe)
    again.restore(done.object, done.probe, done.errors)
    again.add_frames(amp, corners)  # exit waves start from the restored object and probe
    assert again.iterate(1).errors[-1] < 2 * done.errors[-1] < done.errors[0] / 10
    with pytest.raises(ValueError, match="cannot restore an object"):
        again.restore(done.object[:-1], done.probe, [])
