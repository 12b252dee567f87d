"""CXI files (HDF5) in the layout SHARP reads, and the reconstruction file we write.

Scan layout (lengths in metres, energy in joules)::

    /cxi_version                                  150
    /entry_1/instrument_1/source_1/energy         photon energy
    /entry_1/instrument_1/source_1/illumination   initial probe (n, n) complex
    /entry_1/instrument_1/source_1/probe          link to illumination
    /entry_1/instrument_1/detector_1/data         frames (N, n, n), zero frequency centred
    /entry_1/instrument_1/detector_1/distance     sample-detector distance
    /entry_1/instrument_1/detector_1/x_pixel_size, y_pixel_size
    /entry_1/sample_1/geometry_1/translation      (N, 3) sample positions (x, y, z)
    /entry_1/data_1/data, /entry_1/data_1/translation   links to the two above
    /entry_1/sample_1/simulation/object, probe    ground truth, simulations only
"""

from __future__ import annotations

import json
import os

import numpy as np

from sparkmpi.apps.ptycho.scan import Scan, object_pixel_m
from sparkmpi.files import InputFileError, atomic_output, reason

ELECTRON_VOLT_J = 1.602176634e-19
DETECTOR = "/entry_1/instrument_1/detector_1"
SOURCE = "/entry_1/instrument_1/source_1"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
TRUTH = "/entry_1/sample_1/simulation"


class PtychoInputError(InputFileError):
    """A scan file that cannot be used; the message is one line naming the file."""


def write_cxi(scan: Scan, path: str | os.PathLike) -> None:
    """Writes ``scan`` as a CXI file, all or nothing."""
    import h5py

    pixel = scan.object_pixel_m
    y, x = scan.positions[:, 0] * pixel, scan.positions[:, 1] * pixel
    translation = np.column_stack([x, y, np.zeros_like(x)])
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f["cxi_version"] = 150
        f[f"{SOURCE}/energy"] = scan.energy_ev * ELECTRON_VOLT_J
        f[f"{SOURCE}/illumination"] = scan.probe
        f[f"{SOURCE}/probe"] = h5py.SoftLink(f"{SOURCE}/illumination")
        f.create_dataset(
            f"{DETECTOR}/data", data=scan.intensities, chunks=(1, *scan.intensities.shape[1:])
        )
        f[f"{DETECTOR}/distance"] = scan.distance_m
        f[f"{DETECTOR}/x_pixel_size"] = scan.pixel_size_m
        f[f"{DETECTOR}/y_pixel_size"] = scan.pixel_size_m
        f[TRANSLATION] = translation
        f["/entry_1/data_1/data"] = h5py.SoftLink(f"{DETECTOR}/data")
        f["/entry_1/data_1/translation"] = h5py.SoftLink(TRANSLATION)
        f["/entry_1/sample_1/name"] = scan.source
        if scan.truth_object is not None:
            f[f"{TRUTH}/object"] = scan.truth_object
        if scan.truth_probe is not None:
            f[f"{TRUTH}/probe"] = scan.truth_probe


def _dataset(f, name: str, path, ndim: int | None = None) -> np.ndarray:
    """Dataset ``name`` of ``f`` as an array (of ``ndim`` dimensions when given, 0: a number);
    :class:`PtychoInputError` naming the file and the entry otherwise."""
    import h5py

    if name not in f:
        raise PtychoInputError(f"{path}: missing dataset {name}")
    item = f[name]
    if not isinstance(item, h5py.Dataset):
        raise PtychoInputError(f"{path}: {name} is a {type(item).__name__.lower()}, not a dataset")
    try:
        value = np.asarray(item[()])
    except Exception as exc:
        raise PtychoInputError(f"{path}: cannot read {name} ({reason(exc)})") from None
    if value.dtype.kind not in "biufc":
        raise PtychoInputError(f"{path}: {name} holds {value.dtype}, not numbers")
    if ndim is not None and value.ndim != ndim:
        what = "a number" if ndim == 0 else f"{ndim}-D"
        raise PtychoInputError(f"{path}: {name} has shape {value.shape}, expected {what}")
    return value


def read_cxi(path: str | os.PathLike) -> Scan:
    """The scan in a CXI file. Missing or inconsistent entries raise :class:`PtychoInputError`.

    Positions are shifted so the smallest is 0 object pixels. Without an illumination entry
    the initial probe is a disc of the frames' mean power.
    """
    import h5py

    if not os.path.isfile(path):
        raise PtychoInputError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise PtychoInputError(f"{path}: not an HDF5/CXI file ({reason(exc)})") from None
    with f:
        frames = np.asarray(_dataset(f, f"{DETECTOR}/data", path, 3), dtype=np.float32)
        energy_j = float(_dataset(f, f"{SOURCE}/energy", path, 0).real)
        distance = float(_dataset(f, f"{DETECTOR}/distance", path, 0).real)
        pixel = float(_dataset(f, f"{DETECTOR}/x_pixel_size", path, 0).real)
        translation = np.asarray(_dataset(f, TRANSLATION, path, 2), dtype=np.float64)
        probe = f[f"{SOURCE}/illumination"][()] if f"{SOURCE}/illumination" in f else None
        truth = {k: f[f"{TRUTH}/{k}"][()] for k in ("object", "probe") if f"{TRUTH}/{k}" in f}
        name = f["/entry_1/sample_1/name"][()] if "/entry_1/sample_1/name" in f else b""
    if frames.ndim != 3 or frames.shape[1] != frames.shape[2] or len(frames) == 0:
        raise PtychoInputError(f"{path}: frames must be (N, n, n), not {frames.shape}")
    if translation.ndim != 2 or translation.shape[0] != len(frames) or translation.shape[1] < 2:
        raise PtychoInputError(
            f"{path}: {len(frames)} frames but translations of shape {translation.shape}"
        )
    if not (energy_j > 0 and distance > 0 and pixel > 0):
        raise PtychoInputError(f"{path}: energy, distance and pixel size must be positive")
    if not np.isfinite(frames).all():
        raise PtychoInputError(f"{path}: frames hold non-finite values")
    n = frames.shape[1]
    energy_ev = energy_j / ELECTRON_VOLT_J
    positions = translation[:, [1, 0]] / object_pixel_m(energy_ev, distance, pixel, n)
    positions -= np.minimum(positions.min(axis=0), 0)
    if probe is None:
        probe = _disc_probe(n, float(frames.sum(axis=(1, 2)).mean()))
    elif probe.shape != (n, n):
        raise PtychoInputError(f"{path}: illumination {probe.shape} does not match frames {n}x{n}")
    return Scan(
        frames,
        positions,
        probe,
        energy_ev,
        distance,
        pixel,
        truth_object=truth.get("object"),
        truth_probe=truth.get("probe"),
        source=name.decode() if isinstance(name, bytes) else str(name) or os.path.basename(path),
    )


def _disc_probe(n: int, power: float) -> np.ndarray:
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    disc = (np.hypot(y, x) < n / 5).astype(np.complex64)
    return disc * np.sqrt(power / disc.real.sum())


def write_reconstruction(path: str | os.PathLike, rec, record: dict) -> None:
    """Object, probe, error per iteration and illumination as HDF5, with ``record`` as JSON
    in the file's ``record`` attribute; all or nothing."""
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f["object"] = rec.object
        f["probe"] = rec.probe
        f["errors"] = np.asarray(rec.errors, dtype=np.float64)
        f["illumination"] = rec.illumination
        f.attrs["record"] = json.dumps(record)


def read_reconstruction(path: str | os.PathLike) -> dict:
    """What :func:`write_reconstruction` wrote, as a dict of arrays plus ``record``."""
    import h5py

    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in ("object", "probe", "errors", "illumination")}
        out["record"] = json.loads(f.attrs["record"])
    return out
