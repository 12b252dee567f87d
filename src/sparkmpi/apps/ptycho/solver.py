"""Difference map (Thibault) and RAAR (Luke) with object and probe refinement, frames split
over MPI ranks as in SHARP: every rank keeps the exit waves of its own frames, and each
iteration the partial sums of the object and probe updates are combined with
``MPI_Allreduce``, so any number of ranks computes the same iterates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sparkmpi.apps.ptycho.backends import BACKENDS, make_backend

ALGORITHMS = ("raar", "dm")
REGULARISATION = 1e-3  # of the largest update denominator: keeps unlit pixels at their value


@dataclass(frozen=True)
class SolverSettings:
    """What to run: algorithm, iterations, RAAR's β, when probe refinement starts (None:
    never), the array backend and its FFT threads."""

    algorithm: str = "raar"
    iterations: int = 100
    beta: float = 0.75
    probe_start: int | None = 10
    backend: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be raar or dm, not {self.algorithm!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.iterations < 1 or not 0 < self.beta <= 1 or self.threads < 1:
            raise ValueError("iterations and threads must be >= 1 and beta in (0, 1]")


@dataclass
class Reconstruction:
    """The solver's result: object, probe and the normalised Fourier error per iteration."""

    object: np.ndarray
    probe: np.ndarray
    errors: list[float]
    illumination: np.ndarray  # Σ_j |P|² over the windows: where the object is well determined


def _allreduce(comm, array, xp=np):
    """The sum of ``array`` over the ranks of ``comm``, in ``xp``; with one rank ``array``
    itself, so a single GPU rank never copies to the host."""
    if comm is None or comm.size == 1:
        return array
    from mpi4py import MPI

    from sparkmpi.apps.cuda import to_host

    host = np.array(to_host(array), ndmin=1)
    comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
    return xp.asarray(host.reshape(np.shape(array)))


def _update(numerator, denominator, previous):
    """The regularised quotient (num + δ prev) / (den + δ), in the arrays' own module."""
    delta = REGULARISATION * denominator.max() + 1e-30
    return ((numerator + delta * previous) / (denominator + delta)).astype(np.complex64)


class Solver:
    """One rank's share of a reconstruction that frames can join at any time (streaming).

    :meth:`add_frames` is local to the rank; :meth:`iterate` is collective: every rank of
    ``comm`` must call it, each with its own frames (possibly none), and all end with the same
    object and probe.
    """

    def __init__(self, object_shape, probe, settings: SolverSettings | None = None, comm=None):
        self.settings = settings or SolverSettings()
        self.comm = comm
        self.object_shape = tuple(int(v) for v in object_shape)
        if self.settings.backend == "cupy":
            from sparkmpi.apps.cuda import use_rank_device

            use_rank_device(comm)
        self.backend = make_backend(
            self.settings.backend,
            self.object_shape,
            np.shape(probe)[0],
            self.settings.algorithm,
            self.settings.threads,
        )
        self.xp = xp = self.backend.xp
        self.probe = xp.array(np.asarray(probe, dtype=np.complex64))
        self.object = xp.ones(self.object_shape, dtype=np.complex64)
        self._errors: list = []  # per iteration; device scalars until read
        self.frames = 0
        self._power = 0.0
        self._illumination = xp.zeros(self.object_shape, dtype=np.float32)

    def add_frames(self, amplitudes: np.ndarray, positions: np.ndarray) -> None:
        """Adds frames (measured amplitudes in FFT order, integer window corners) to this
        rank's share; their exit waves start from the current object and probe."""
        n = self.probe.shape[0]
        amplitudes = np.asarray(amplitudes, dtype=np.float32).reshape(-1, n, n)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
        if len(positions) != len(amplitudes):
            raise ValueError(f"{len(amplitudes)} frames but {len(positions)} positions")
        if len(positions) and (
            positions.min() < 0 or (positions.max(axis=0) + n > np.asarray(self.object_shape)).any()
        ):
            raise ValueError(
                f"frame windows of {n}x{n} fall outside the object {self.object_shape}"
            )
        self.backend.add(amplitudes, positions, self.probe, self.object)
        self._power += float(np.sum(amplitudes.astype(np.float64) ** 2))
        self.frames += len(amplitudes)

    def restore(self, obj, probe, errors: list[float]) -> None:
        """Continues from an earlier result, before frames are added: its object, probe and
        error history (so iteration counts, and when probe refinement starts, carry on)."""
        if np.shape(obj) != self.object_shape or np.shape(probe) != tuple(self.probe.shape):
            raise ValueError(
                f"cannot restore an object {np.shape(obj)} and probe {np.shape(probe)} into "
                f"a solver of {self.object_shape} and {tuple(self.probe.shape)}"
            )
        self.object = self.xp.array(np.asarray(obj, dtype=np.complex64))
        self.probe = self.xp.array(np.asarray(probe, dtype=np.complex64))
        self._errors = [float(e) for e in errors]

    def iterate(
        self, iterations: int, progress: Callable[[int, float], None] | None = None
    ) -> Reconstruction:
        """Runs ``iterations`` more iterations over every rank's frames; ``progress(i, error)``
        after each (i counts from the first iteration ever)."""
        comm, settings, xp = self.comm, self.settings, self.xp
        backend = self.backend
        beta = settings.beta if settings.algorithm == "raar" else 1.0
        total = float(_allreduce(comm, np.array([self._power]))[0])
        obj_den = _allreduce(comm, backend.illumination(self.probe), xp)
        for _ in range(iterations):
            i = len(self._errors)
            obj_num, err = backend.fourier_pass(self.probe, self.object, beta)
            err = _allreduce(comm, err, xp)
            self.object = _update(_allreduce(comm, obj_num, xp), obj_den, self.object)
            if settings.probe_start is not None and i >= settings.probe_start:
                num, den = backend.probe_sums(self.object)
                self.probe = _update(
                    _allreduce(comm, num, xp), _allreduce(comm, den, xp), self.probe
                )
                obj_den = _allreduce(comm, backend.illumination(self.probe), xp)
            self._errors.append(err / max(total, 1e-30))
            if progress is not None:
                progress(i, float(self._errors[-1]))
        self._illumination = obj_den
        return self.result()

    @property
    def errors(self) -> list[float]:
        """The normalised Fourier error of every iteration so far (reading it waits for the
        device)."""
        self._errors = [float(e) for e in self._errors]
        return list(self._errors)

    def result(self) -> Reconstruction:
        """Object, probe, errors and illumination so far, as host numpy arrays."""
        from sparkmpi.apps.cuda import to_host

        return Reconstruction(
            to_host(self.object),
            to_host(self.probe),
            self.errors,
            to_host(self._illumination).astype(np.float32),
        )


def solve(
    amplitudes: np.ndarray,
    positions: np.ndarray,
    object_shape: tuple[int, int],
    probe: np.ndarray,
    settings: SolverSettings | None = None,
    comm=None,
    progress: Callable[[int, float], None] | None = None,
) -> Reconstruction:
    """Reconstructs object and probe from this rank's frames.

    ``amplitudes`` (frames, n, n) are the measured Fourier amplitudes in FFT order,
    ``positions`` (frames, 2) the integer window corners; ``comm`` (an mpi4py communicator,
    or None alone) joins the ranks, every one of which must call this with its own frames
    (possibly none). Every rank returns the same object and probe. ``progress(i, error)``
    runs after iteration i.
    """
    solver = Solver(object_shape, probe, settings, comm)
    solver.add_frames(amplitudes, positions)
    return solver.iterate(solver.settings.iterations, progress)


def phase_error(
    estimate: np.ndarray, truth: np.ndarray, weight: np.ndarray, remove_ramp: bool = False
) -> float:
    """RMS phase difference (radians) of two complex images where ``weight`` > 0, after
    removing the best global phase offset (and linear ramp when ``remove_ramp``)."""
    mask = weight > 0
    diff = np.angle(estimate * np.conj(truth))
    offset = np.angle(np.sum(weight[mask] * np.exp(1j * diff[mask])))
    diff = np.angle(np.exp(1j * (diff - offset)))
    if remove_ramp:
        y, x = np.nonzero(mask)
        design = np.column_stack([np.ones_like(y), y, x]).astype(np.float64)
        w = np.sqrt(weight[mask])
        coef, *_ = np.linalg.lstsq(design * w[:, None], diff[mask] * w, rcond=None)
        diff = diff.copy()
        diff[mask] -= design @ coef
    return float(np.sqrt(np.average(diff[mask] ** 2, weights=weight[mask])))
