"""Small PNG pictures for the page (slices, 2-D images, histogram, error curve) as data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_uri(image: np.ndarray, lo: float, hi: float, cmap: str = "gray", size: int = 256) -> str:
    """``image`` scaled to [lo, hi] in ``cmap``, its longer side resampled to about ``size``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    step = max(1, int(np.ceil(max(image.shape) / size)))
    shown = np.asarray(image, dtype=np.float32)[::step, ::step]
    buffer = io.BytesIO()
    hi = hi if hi > lo else lo + 1e-6
    matplotlib.image.imsave(
        buffer, shown, cmap=cmap, vmin=lo, vmax=hi, origin="upper", format="png"
    )
    return _uri(buffer.getvalue())


def _figure_uri(draw, width: float = 3.6, height: float = 2.2) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=90)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return _uri(buffer.getvalue())


def histogram_uri(values: np.ndarray, lo: float, hi: float) -> str:
    """A histogram of ``values`` with the current window [lo, hi] marked."""
    sample = np.asarray(values, dtype=np.float32).ravel()[:: max(1, values.size // 2_000_000)]

    def draw(ax):
        ax.hist(sample, bins=128, color="0.4", log=True)
        ax.axvspan(lo, hi, color="tab:orange", alpha=0.25)
        ax.set_title("histogram (window shaded)", fontsize=9)
        ax.tick_params(labelsize=7)

    return _figure_uri(draw)


def errors_uri(errors: list[float]) -> str:
    """The error per iteration, log scale."""

    def draw(ax):
        if errors:
            ax.semilogy(np.arange(1, len(errors) + 1), errors)
        ax.set_title("error per iteration", fontsize=9)
        ax.tick_params(labelsize=7)

    return _figure_uri(draw)
