"""The viewer page (trame): a volume rendering with a colour/opacity window, three orthogonal
slices with sliders, a histogram and the metadata; 2-D results as images with colour map and
range; in live mode the page follows a streaming run's results."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np

from sparkmpi.viz.data import Dataset, load
from sparkmpi.viz.follow import Follower
from sparkmpi.viz.pictures import errors_uri, histogram_uri, image_uri

COLORMAPS = ("gray", "viridis", "magma", "twilight")
PAGE_STYLE = "font-family: sans-serif; margin: 12px; color: #222;"


def _percent(values: np.ndarray, lo_pct: float, hi_pct: float) -> tuple[float, float]:
    vmin, vmax = float(values.min()), float(values.max())
    span = vmax - vmin or 1.0
    return vmin + span * lo_pct / 100, vmin + span * hi_pct / 100


class Viewer:
    """One page for one dataset (replaced as a live run publishes results)."""

    def __init__(self, server, dataset: Dataset, follower: Follower | None = None):
        self.server, self.follower = server, follower
        self.state = server.state
        self.scene = None
        self.view = None
        self.dataset = dataset
        self._init_state(dataset)
        self._layout()
        self._bind()
        if follower is not None:
            server.controller.on_server_ready.add(self._start_following)

    # -- state -------------------------------------------------------------------------
    def _init_state(self, d: Dataset) -> None:
        s = self.state
        s.source = d.source
        s.kind = "volume" if d.volume is not None else "image"
        s.metadata = json.dumps(d.metadata, indent=1, default=str)
        s.window_low, s.window_high = 20, 100
        s.colormap = "gray"
        s.progress = ""
        s.errors_png = errors_uri(d.errors) if d.errors else ""
        s.image_names = list(d.images)
        s.image_name = s.image_names[0] if d.images else ""
        if d.volume is not None:
            nz, ny, nx = d.volume.shape
            s.z, s.y, s.x = nz // 2, ny // 2, nx // 2
            s.nz, s.ny, s.nx = nz - 1, ny - 1, nx - 1
            from sparkmpi.viz.render import VolumeScene

            self.scene = VolumeScene(d.volume)
        self._refresh()

    def _refresh(self) -> None:
        s, d = self.state, self.dataset
        if d.volume is not None:
            lo, hi = _percent(d.volume, float(s.window_low), float(s.window_high))
            z, y, x = int(s.z), int(s.y), int(s.x)
            s.slice_z = image_uri(d.volume[z], lo, hi, s.colormap)
            s.slice_y = image_uri(d.volume[:, y, :], lo, hi, s.colormap)
            s.slice_x = image_uri(d.volume[:, :, x], lo, hi, s.colormap)
            s.histogram = histogram_uri(d.volume, lo, hi)
            self.scene.set_window(lo, hi)
            if self.view is not None:
                self.view.update()
        elif d.images:
            image = d.images.get(s.image_name)
            if image is None:
                image = next(iter(d.images.values()))
            lo, hi = _percent(image, float(s.window_low), float(s.window_high))
            s.image = image_uri(image, lo, hi, s.colormap, size=480)
            s.histogram = histogram_uri(image, lo, hi)

    def _bind(self) -> None:
        names = ("window_low", "window_high", "colormap", "z", "y", "x", "image_name")
        self.state.change(*names)(lambda **_: self._refresh())

    # -- layout ------------------------------------------------------------------------
    def _layout(self) -> None:
        from trame.ui.html import DivLayout
        from trame.widgets import html
        from trame.widgets import vtk as vtk_widgets

        with DivLayout(self.server, style=PAGE_STYLE):
            html.H3("{{ source }}", style="margin: 4px 0;")
            html.Div("{{ progress }}", id="progress", style="font-weight: bold;")
            with html.Div(style="display: flex; gap: 16px; flex-wrap: wrap;"):
                with html.Div(v_if="kind == 'volume'", style="width: 480px; height: 480px;"):
                    if self.scene is not None:
                        self.view = vtk_widgets.VtkRemoteView(
                            self.scene.window, id="volume-view", interactive_ratio=1
                        )
                with html.Div(v_if="kind == 'volume'", id="slices"):
                    for axis, label, limit in (
                        ("z", "XY", "nz"),
                        ("y", "XZ", "ny"),
                        ("x", "YZ", "nx"),
                    ):
                        with html.Div(style="display: flex; align-items: center; gap: 8px;"):
                            html.Img(
                                src=(f"slice_{axis}",), id=f"slice-{axis}", style="width: 200px;"
                            )
                            html.Div(f"{label} {axis} = {{{{ {axis} }}}}")
                            html.Input(
                                type="range",
                                min=0,
                                max=(limit,),
                                id=f"slider-{axis}",
                                v_model_number=(axis,),
                            )
                with html.Div(v_if="kind == 'image'"):
                    html.Img(src=("image",), id="image-view", style="width: 480px;")
                    with html.Select(v_model=("image_name",), id="image-name"):
                        html.Option("{{ name }}", v_for="name in image_names", value=("name",))
                with html.Div():
                    html.Img(src=("histogram",), id="histogram")
                    html.Img(v_if="errors_png", src=("errors_png",), id="errors")
                    with html.Div():
                        html.Span("window low %")
                        html.Input(type="range", min=0, max=100, v_model_number=("window_low",))
                        html.Span("high %")
                        html.Input(type="range", min=0, max=100, v_model_number=("window_high",))
                    with html.Select(v_model=("colormap",), id="colormap"):
                        for name in COLORMAPS:
                            html.Option(name, value=name)
                    html.Pre("{{ metadata }}", id="metadata", style="font-size: 11px;")

    # -- live mode ---------------------------------------------------------------------
    def _start_following(self, **_) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        while True:
            path = await asyncio.to_thread(self.follower.newest)
            if path is not None:
                try:
                    dataset = await asyncio.to_thread(load, path)
                except Exception as exc:  # a result being replaced: try the next one
                    with self.state:
                        self.state.progress = f"could not read {path}: {exc}"
                else:
                    self._show_result(dataset)
            await asyncio.sleep(self.follower.interval)

    def _show_result(self, dataset: Dataset) -> None:
        meta = dataset.metadata
        with self.state:
            self.dataset = dataset
            self.state.source = dataset.source
            self.state.metadata = json.dumps(meta, indent=1, default=str)
            self.state.image_names = list(dataset.images)
            if self.state.image_name not in dataset.images:
                self.state.image_name = next(iter(dataset.images), "")
            self.state.errors_png = errors_uri(dataset.errors) if dataset.errors else ""
            used, expected = meta.get("frames_used"), meta.get("frames_expected")
            batch = meta.get("batch")
            error = meta.get("error")
            final = " (final)" if meta.get("final") else ""
            self.state.progress = (
                f"batch {batch}{final}: {used}/{expected} frames, error {error:.2e}"
                if error is not None
                else f"batch {batch}{final}"
            )
            self._refresh()


def check_port_free(host: str, port: int) -> None:
    """Raises ValueError, one line, if another program listens on ``host``:``port``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"{host}:{port} is not free ({exc.strerror}): pick another with --port"
            ) from None


def serve(path: str | None, port: int = 8080, host: str = "127.0.0.1", follow: str | None = None):
    """Serves the page for ``path`` (or, with ``follow``, for a streaming run's newest result)
    until interrupted. Raises :class:`~sparkmpi.viz.data.ViewerInputError` for a bad file."""
    from trame.app import get_server

    check_port_free(host, port)  # before loading anything: a taken port is one line
    follower = Follower(follow) if follow else None
    if path is not None:
        dataset = load(path)
    else:
        dataset = Dataset(follow or "", images={"waiting for results": np.zeros((8, 8))})
    server = get_server("sparkmpi-view", client_type="vue3")
    Viewer(server, dataset, follower)
    print(f"spark-mpi view: http://{host}:{port}/", flush=True)
    if follower is not None and follower.waiting_for_directory:
        print(f"spark-mpi view: waiting for {follow} to appear", flush=True)
    server.start(port=port, host=host, open_browser=False, show_connection_info=False)
