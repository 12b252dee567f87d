"""The ptychography GPU backend: its CUDA kernels compile, the stack formulation they share
with the numpy reference gives the CPU backend's iterates (streaming included), a machine
without a GPU gets one clear line, and the solver benchmark runs without Spark or MPI.
Tests that need a GPU skip elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import compile_cuda, ptx_entries, spark_mpi
from sparkmpi.apps.cuda import GPUUnavailable, unavailable_reason
from sparkmpi.apps.ptycho.gpu import KERNELS, SOURCE
from sparkmpi.apps.ptycho.scan import amplitudes
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.ptycho.solver import Solver, SolverSettings

NO_GPU = unavailable_reason()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"no GPU: {NO_GPU}")


@pytest.fixture(scope="module")
def scan():
    return simulate(48, 32)


def streamed(scan, settings: SolverSettings, batches: int = 2, iterations: int = 3):
    """Frames added in ``batches`` parts, ``iterations`` after each: the streaming path."""
    solver = Solver(scan.object_shape(), scan.probe, settings)
    amps, corners = amplitudes(scan.intensities), scan.pixel_positions()
    for part in np.array_split(np.arange(len(amps)), batches):
        solver.add_frames(amps[part], corners[part])
        rec = solver.iterate(iterations)
    return rec


def assert_same_iterates(reference, other) -> None:
    lit = reference.illumination > 0.5 * reference.illumination.max()
    scale = np.abs(reference.object[lit]).max()
    np.testing.assert_allclose(other.object[lit], reference.object[lit], atol=2e-3 * scale)
    probe_scale = np.abs(reference.probe).max()
    np.testing.assert_allclose(other.probe, reference.probe, atol=2e-3 * probe_scale)
    np.testing.assert_allclose(other.errors, reference.errors, rtol=2e-3)


def test_kernels_compile_with_nvcc(tmp_path):
    assert ptx_entries(compile_cuda(SOURCE, tmp_path)) == set(KERNELS)


@pytest.mark.parametrize("algorithm", ["raar", "dm"])
def test_stack_formulation_streams_frames_like_the_cpu_backend(scan, algorithm):
    common = dict(algorithm=algorithm, probe_start=2)
    cpu = streamed(scan, SolverSettings(**common, backend="cpu"))
    stack = streamed(scan, SolverSettings(**common, backend="numpy"))
    assert len(stack.errors) == 6
    assert_same_iterates(cpu, stack)


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a GPU")
def test_cupy_without_a_gpu_is_one_clear_line(scan):
    with pytest.raises(GPUUnavailable) as caught:
        Solver(scan.object_shape(), scan.probe, SolverSettings(backend="cupy"))
    message = str(caught.value)
    assert "needs an NVIDIA GPU" in message and "\n" not in message


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a GPU")
def test_reconstruct_command_stops_before_spark_without_a_gpu(tmp_path):
    scan_file, output = tmp_path / "scan.cxi", tmp_path / "rec.h5"
    assert (
        spark_mpi("ptycho", "simulate", str(scan_file), "--frames", "8", "--size", "16").returncode
        == 0
    )
    done = spark_mpi("ptycho", "reconstruct", str(scan_file), str(output), "--backend", "cupy")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"spark-mpi ptycho reconstruct: backend 'cupy' needs an NVIDIA GPU: {NO_GPU}"
    ]
    assert not output.exists() and not output.with_suffix(".png").exists()


def test_gpu_benchmark_needs_neither_spark_nor_mpi(tmp_path):
    """Runs the benchmark with pyspark and mpi4py made unimportable, as on a GPU machine that
    has only Python, numpy and CUDA."""
    backend = "numpy" if NO_GPU else "cupy"
    out_json, out_png = tmp_path / "gpu.json", tmp_path / "gpu.png"
    program = (
        "import runpy, sys\n"
        "sys.modules.update(pyspark=None, mpi4py=None)\n"
        f"sys.argv = ['gpu', '--quick', '--backend', '{backend}', '--tomo-size', '16',\n"
        f"            '--json', r'{out_json}', '--plot', r'{out_png}']\n"
        "runpy.run_module('sparkmpi.bench.gpu', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["backend"] == backend and result["provenance"]["commit"]
    assert result["ptycho"]["seconds"] > 0 and result["fft_bound_s"] > 0
    assert result["ptycho"]["phase_error_rad"] == pytest.approx(
        result["cpu_backend"]["phase_error_rad"], abs=1e-3
    )
    assert result["tomo"]["art_max_difference"] < 1e-3
    assert out_png.stat().st_size > 1000


@needs_gpu
def test_cupy_kernels_equal_the_numpy_reference_step_by_step(scan):
    import cupy

    from sparkmpi.apps.ptycho.array_ops import NumpyOps
    from sparkmpi.apps.ptycho.gpu import CupyOps

    host, device = NumpyOps(), CupyOps()
    rng = np.random.default_rng(1)
    n, pos = scan.frame_size, scan.pixel_positions()
    shape = scan.object_shape()
    obj = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    probe = scan.probe / np.abs(scan.probe).max()
    amp = amplitudes(scan.intensities) / np.float32(np.abs(scan.probe).max())
    g_host, g_dev = host.geometry(pos, n, shape[1]), device.geometry(pos, n, shape[1])
    d = cupy.asarray

    def close(a, b, rel=1e-4):
        b = cupy.asnumpy(b)
        np.testing.assert_allclose(b, a, atol=rel * max(float(np.abs(a).max()), 1e-30))

    psi = host.exit_waves(probe, obj, g_host)
    close(psi, device.exit_waves(d(probe), d(obj), g_dev))
    w = psi * np.complex64(0.5 - 0.25j)
    psi_d, w_d = d(psi), d(w)
    buf, buf_d = np.empty_like(psi), cupy.empty_like(psi_d)
    host.raar_prepare(psi, w, probe, obj, g_host, 0.75, buf)
    device.raar_prepare(psi_d, w_d, d(probe), d(obj), g_dev, 0.75, buf_d)
    close(buf, buf_d)
    host.fft(buf, True)
    device.fft(buf_d, True)
    close(buf, buf_d)
    err = host.modulus(buf, amp)
    assert float(device.modulus(buf_d, d(amp))) == pytest.approx(err, rel=1e-4)
    close(buf, buf_d)
    host.fft(buf, False)
    device.fft(buf_d, False)
    close(buf, buf_d)
    num, num_d = np.zeros(shape, np.complex64), cupy.zeros(shape, np.complex64)
    host.raar_finish(psi, w, probe, g_host, buf, num)
    device.raar_finish(psi_d, w_d, d(probe), g_dev, buf_d, num_d)
    close(w, w_d)
    close(num, num_d)
    host.dm_finish(psi, probe, obj, g_host, buf, num)
    device.dm_finish(psi_d, d(probe), d(obj), g_dev, buf_d, num_d)
    close(psi, psi_d)
    close(num, num_d)
    den, den_d = np.zeros(shape, np.float32), cupy.zeros(shape, np.float32)
    host.illumination(probe, g_host, den)
    device.illumination(d(probe), g_dev, den_d)
    close(den, den_d)
    sums = zip(host.probe_sums(w, obj, g_host), device.probe_sums(w_d, d(obj), g_dev), strict=True)
    for a, b in sums:
        close(a, b)


@needs_gpu
@pytest.mark.parametrize("algorithm", ["raar", "dm"])
def test_cupy_backend_computes_the_cpu_iterates(scan, algorithm):
    common = dict(algorithm=algorithm, probe_start=2)
    cpu = streamed(scan, SolverSettings(**common, backend="cpu"))
    gpu = streamed(scan, SolverSettings(**common, backend="cupy"))
    assert_same_iterates(cpu, gpu)
