"""The picture of a reconstruction (the seed's Fig. 10): object amplitude and phase, probe,
and the Fourier error per iteration."""

from __future__ import annotations

import os

import numpy as np

from sparkmpi.files import atomic_output


def illuminated_object(obj: np.ndarray, illumination: np.ndarray):
    """The object cropped to where it is lit (illumination above 10% of its peak; everywhere
    if nothing is), with the global phase that ptychography cannot fix removed, and the lit
    mask over the crop."""
    lit = illumination > 0.1 * float(illumination.max())
    if not lit.any():
        lit = np.ones(obj.shape, dtype=bool)
    rows, cols = np.nonzero(lit)
    crop = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    offset = np.angle(np.sum(obj[lit]))
    return obj[crop] * np.exp(-1j * offset), lit[crop]


def save_reconstruction_png(rec, path: str | os.PathLike, title: str = "") -> None:
    """Writes a PNG of ``rec`` (a :class:`~sparkmpi.apps.ptycho.solver.Reconstruction`):
    object amplitude and phase cropped to the illuminated area, probe amplitude, and the
    error curve; all or nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj, lit = illuminated_object(rec.object, rec.illumination)
    phase = np.angle(obj)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
    panels = [
        (np.abs(obj), "object amplitude", "gray"),
        (np.where(lit, phase, np.nan), "object phase (rad)", "viridis"),
        (np.abs(rec.probe), "probe amplitude", "magma"),
    ]
    for ax, (image, label, cmap) in zip(axes, panels, strict=False):
        finite = image[np.isfinite(image)]
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1)
        shown = ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(label)
        ax.set_xlabel("x (pixels)")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    axes[-1].semilogy(np.arange(1, len(rec.errors) + 1), rec.errors)
    axes[-1].set_xlabel("iteration")
    axes[-1].set_title("Fourier error")
    axes[-1].grid(True, which="both", alpha=0.3)
    fig.suptitle(title, parse_math=False)  # a file name may hold $
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
