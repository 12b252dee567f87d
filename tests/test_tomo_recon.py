"""Projector and reconstruction algorithms on small phantoms (no Spark)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi.apps.tomo.algorithms import art, art_textbook, estimate_center, fbp, rmse, sirt
from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series, tilt_angles
from sparkmpi.apps.tomo.projector import project, row_norms_sq, system_matrix

ANGLES = tuple(np.linspace(-70, 70, 20))


@pytest.fixture(scope="module")
def phantom():
    return blobs_phantom((3, 64, 64), n_blobs=10, seed=1)


@pytest.fixture(scope="module")
def geometry(phantom):
    A = system_matrix(64, ANGLES)
    return A, project(phantom, A)


def test_ray_lengths_are_exact():
    A = system_matrix(4, (0.0, 90.0, 45.0)).toarray().reshape(3, 4, 4, 4)
    # at 0° the ray through bin 1 runs along column x = 1 of every row
    assert (A[0, 1][:, 1] == 1).all() and A[0, 1].sum() == 4
    assert np.allclose(A[1].sum(axis=(1, 2)), 4)
    # at 45° chords of the 4x4 square at distance 0.5 and 1.5 from its centre
    diagonal = 4 * 2**0.5
    chords = [diagonal - 3, diagonal - 1, diagonal - 1, diagonal - 3]
    assert np.allclose(A[2].sum(axis=(1, 2)), chords)


def test_matrix_is_cached_and_shared():
    assert system_matrix(32, ANGLES) is system_matrix(32, ANGLES)
    assert system_matrix(32, ANGLES) is not system_matrix(32, ANGLES, center=15.0)


def test_a_disc_projects_to_its_chord_at_every_angle():
    n = 96
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    disc = (np.hypot(yy, xx) < 30).astype(np.float32)
    sino = project(disc[None], system_matrix(n, ANGLES))[0]
    centre_ray = sino[:, n // 2]
    assert np.allclose(centre_ray, 60, atol=1.5)
    assert sino.sum(axis=1) == pytest.approx(np.full(len(ANGLES), disc.sum()), rel=5e-3)


def test_vectorised_art_is_the_textbook_row_by_row_kaczmarz(phantom, geometry):
    A, sinos = geometry
    fast = art(sinos, A, 2, beta=0.7)
    for z in range(len(phantom)):
        slow = art_textbook(sinos[z], A, 2, beta=0.7)
        np.testing.assert_allclose(fast[z], slow, rtol=1e-4, atol=1e-5)


def test_art_error_falls_with_iterations(phantom, geometry):
    A, sinos = geometry
    errors = [rmse(art(sinos, A, it, beta=0.5), phantom) for it in (1, 3, 10)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.4 * rmse(np.zeros_like(phantom), phantom)


def test_art_calls_progress_after_every_sweep(geometry):
    A, sinos = geometry
    seen = []
    art(sinos, A, 3, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_sirt_and_fbp_have_sensible_errors(phantom, geometry):
    A, sinos = geometry
    zero = rmse(np.zeros_like(phantom), phantom)
    assert rmse(sirt(sinos, A, 50), phantom) < 0.45 * zero
    assert rmse(fbp(sinos, np.array(ANGLES)), phantom) < 0.7 * zero
    full = np.arange(0, 180, 1.0)
    assert rmse(fbp(project(phantom, system_matrix(64, tuple(full))), full), phantom) < 0.25 * zero


def test_rotation_centre_is_found_to_a_fraction_of_a_bin(phantom):
    angles = np.arange(0, 180, 1.0)
    sino = project(phantom, system_matrix(64, tuple(angles), 64, 29.0))[1]
    assert estimate_center(sino, angles) == pytest.approx(29.0, abs=0.3)


def test_simulated_series_is_the_seed_papers_geometry():
    angles = tilt_angles()
    assert len(angles) == 74 and angles[0] == -73 and angles[-1] == 73
    volume = blobs_phantom((4, 32, 32), n_blobs=5)
    series = simulate_tilt_series(volume, angles)
    assert series.shape == (74, 4, 32) and series.dtype == np.float32
    assert (volume >= 0).all() and volume.max() == 1.0
    assert np.array_equal(volume, blobs_phantom((4, 32, 32), n_blobs=5))


def test_row_norms_match_dense_rows(geometry):
    A, _ = geometry
    dense = A[:50].toarray()
    np.testing.assert_allclose(row_norms_sq(A)[:50], (dense**2).sum(axis=1), rtol=1e-5)


def test_mismatched_sinograms_are_refused(geometry):
    A, sinos = geometry
    with pytest.raises(ValueError, match="do not match"):
        art(sinos[:, :, :10], A, 1)


@pytest.mark.parametrize(("n", "center"), [(24, None), (30, 10.5)])
def test_the_fbp_kernel_is_the_per_angle_gather(n, center):
    from sparkmpi.apps.tomo.algorithms import _backproject_gather, ramp_filtered

    rng = np.random.default_rng(3)
    sinos = rng.random((5, 37, 24), np.float32)  # 5 slices, 37 angles, 24 bins
    angles = np.sort(rng.uniform(0, 180, 37))
    c = (24 - 1) / 2 if center is None else center
    reference = _backproject_gather(ramp_filtered(sinos), np.deg2rad(angles), n, c, np)
    reference *= np.float32(np.pi / 37)
    kernel = fbp(sinos, angles, n=n, center=center)
    assert kernel.shape == (5, n, n)
    np.testing.assert_allclose(kernel, reference, atol=1e-5 * np.abs(reference).max())
