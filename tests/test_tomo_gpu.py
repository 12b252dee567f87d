"""The tomography GPU backend (``backend="cupy"``). Everywhere: its CUDA kernel compiles with
nvcc, its host-side layout gives the CPU's ART, the shared SIRT/FBP code is what it was, and
without a GPU it stops with one line. On a GPU: cupy results equal the CPU ones."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import compile_cuda, ptx_entries, spark_mpi
from sparkmpi.apps.cuda import GPUUnavailable, unavailable_reason
from sparkmpi.apps.tomo.algorithms import _kaczmarz_sweep, art, fbp, sirt
from sparkmpi.apps.tomo.gpu import ART_SOURCE, art_layout, device_system_matrix, pixel_positions
from sparkmpi.apps.tomo.io import TiltSeries
from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series, tilt_angles
from sparkmpi.apps.tomo.pipeline import ReconSettings, reconstruct_slab
from sparkmpi.apps.tomo.projector import project, system_matrix
from sparkmpi.apps.tomo.tiff import write_tiff_series

NO_GPU = unavailable_reason()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"needs a GPU: {NO_GPU}")
without_gpu = pytest.mark.skipif(NO_GPU is None, reason="checks the no-GPU path; a GPU is here")
ANGLES = tuple(np.linspace(-70, 70, 20))


@pytest.fixture(scope="module")
def problem():
    """Three 48² slices seen by 56 detector bins off-centre, so some rays miss the slice."""
    A = system_matrix(48, ANGLES, 56, 25.0)
    phantom = blobs_phantom((3, 48, 48), n_blobs=6, seed=4)
    noise = np.random.default_rng(0).normal(0, 0.3, (3, len(ANGLES), 56))
    return A, (project(phantom, A) + noise).astype(np.float32)


def _close(result, expected, rtol=1e-3):
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= rtol * np.abs(expected).max()


def test_art_kernel_compiles_with_plain_nvcc(tmp_path):
    assert ptx_entries(compile_cuda(ART_SOURCE, tmp_path)) == {"art_sweep"}


@pytest.mark.parametrize("n_pix", [32 * 32, 30 * 30, 7 * 9])
def test_stored_pixel_order_is_a_permutation(n_pix):
    position, n_store = pixel_positions(n_pix)
    assert len(np.unique(position)) == n_pix and position.max() < n_store
    assert n_store == n_pix or n_pix == 30 * 30  # a 30² slice is padded to whole 4x8 tiles


def test_kernel_layout_reproduces_cpu_art_exactly(problem):
    A, sinos = problem
    layout = art_layout(A)
    assert layout.rows is not None and len(layout.rows) < A.shape[0]
    x0 = np.random.default_rng(1).uniform(-0.1, 0.5, (1, 48, 48)).astype(np.float32)
    kept = x0.copy()
    expected = art(sinos[:1], A, 2, beta=0.7, positivity=False, x0=x0)
    assert np.array_equal(x0, kept)
    b = np.ascontiguousarray(sinos[:1].reshape(1, -1)[:, layout.rows].T)
    x = np.zeros((layout.n_store, 1), dtype=np.float32)
    x[layout.position] = x0.reshape(-1, 1)
    for _ in range(2):
        _kaczmarz_sweep(
            layout.indptr, layout.indices, layout.data, layout.norms, b, x, np.float32(0.7)
        )
    assert np.array_equal(x[layout.position, 0].reshape(1, 48, 48), expected)


def test_unknown_backend_is_refused_naming_the_choices(problem):
    A, sinos = problem
    for call in (
        lambda: art(sinos, A, 1, backend="tpu"),
        lambda: sirt(sinos, A, 1, backend="tpu"),
        lambda: fbp(sinos, np.array(ANGLES), backend="tpu"),
        lambda: ReconSettings(backend="tpu"),
    ):
        with pytest.raises(ValueError, match="backend must be one of cpu, cupy, not 'tpu'"):
            call()


@without_gpu
def test_cupy_backend_without_a_gpu_says_so_in_one_line(problem):
    A, sinos = problem
    for call in (
        lambda: art(sinos, A, 1, backend="cupy"),
        lambda: sirt(sinos, A, 1, backend="cupy"),
        lambda: fbp(sinos, np.array(ANGLES), backend="cupy"),
        lambda: device_system_matrix(A),
        lambda: reconstruct_slab(sinos, np.array(ANGLES), ReconSettings(backend="cupy")),
    ):
        with pytest.raises(GPUUnavailable, match=r"^backend 'cupy' needs an NVIDIA GPU: ") as e:
            call()
        assert "\n" not in str(e.value)


@without_gpu
def test_command_with_backend_cupy_stops_in_one_line_before_spark(tmp_path):
    angles = tilt_angles(60, 20)
    series = simulate_tilt_series(blobs_phantom((2, 16, 16), n_blobs=2), angles)
    tif, out = tmp_path / "tilt.tif", tmp_path / "volume.h5"
    write_tiff_series(tif, TiltSeries(series, angles, "tiny"))
    done = spark_mpi("tomo", "reconstruct", str(tif), str(out), "--backend", "cupy", timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]  # no Spark start-up log, no traceback
    assert lines[0].startswith("spark-mpi tomo reconstruct: backend 'cupy' needs an NVIDIA GPU")
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tilt.tif"]


@needs_gpu
@pytest.mark.parametrize("positivity", [True, False])
@pytest.mark.parametrize("start", [None, "x0"])
def test_cupy_art_equals_cpu_art(problem, positivity, start):
    A, sinos = problem
    x0 = None
    if start:
        x0 = np.random.default_rng(2).uniform(-0.1, 0.5, (3, 48, 48)).astype(np.float32)
    kept = None if x0 is None else x0.copy()
    kwargs = dict(beta=0.7, positivity=positivity, x0=x0)
    on_gpu = art(sinos, A, 3, backend="cupy", **kwargs)
    _close(on_gpu, art(sinos, A, 3, **kwargs))
    assert x0 is None or np.array_equal(x0, kept)


@needs_gpu
def test_cupy_art_reuses_the_uploaded_matrix_and_reports_progress():
    A = system_matrix(64, ANGLES)
    sinos = project(blobs_phantom((4, 64, 64), n_blobs=8, seed=1), A)
    assert device_system_matrix(A) is device_system_matrix(A)
    seen = []
    on_gpu = art(sinos, A, 2, progress=lambda i, n: seen.append((i, n)), backend="cupy")
    assert seen == [(0, 2), (1, 2)]
    _close(on_gpu, art(sinos, A, 2))
    _close(art(sinos, A, 1, backend="cupy"), art(sinos, A, 1))


@needs_gpu
def test_cupy_sirt_and_fbp_equal_the_cpu_ones(problem):
    A, sinos = problem
    _close(sirt(sinos, A, 10, backend="cupy"), sirt(sinos, A, 10))
    _close(sirt(sinos, A, 3, False, backend="cupy"), sirt(sinos, A, 3, False))
    angles = np.array(ANGLES)
    _close(fbp(sinos, angles, backend="cupy"), fbp(sinos, angles))
    _close(
        fbp(sinos, angles, n=48, center=25.0, filter="shepp-logan", backend="cupy"),
        fbp(sinos, angles, n=48, center=25.0, filter="shepp-logan"),
    )


@needs_gpu
@pytest.mark.parametrize("algorithm", ["art", "sirt", "fbp"])
def test_a_slab_reconstructs_alike_on_both_backends(algorithm):
    angles = tilt_angles()
    sinos = project(blobs_phantom((4, 32, 32), n_blobs=4), system_matrix(32, tuple(angles)))
    settings = ReconSettings(algorithm, iterations=3, backend="cupy")
    on_cpu = ReconSettings(algorithm, iterations=3)
    _close(reconstruct_slab(sinos, angles, settings), reconstruct_slab(sinos, angles, on_cpu))
