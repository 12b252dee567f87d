"""Server-side VTK volume rendering (offscreen): the browser receives images, so the volume's
size never reaches it; volumes above ``MAX_RENDER_VOXELS`` are rendered from a strided copy."""

from __future__ import annotations

import numpy as np

MAX_RENDER_VOXELS = 160**3


def decimated(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """``volume`` strided so it has at most MAX_RENDER_VOXELS voxels, and the stride."""
    stride = 1
    while volume[::stride, ::stride, ::stride].size > MAX_RENDER_VOXELS:
        stride += 1
    return np.ascontiguousarray(volume[::stride, ::stride, ::stride]), stride


class VolumeScene:
    """A render window with one volume whose colour/opacity window can be changed."""

    def __init__(self, volume: np.ndarray):
        import vtkmodules.vtkInteractionStyle
        import vtkmodules.vtkRenderingOpenGL2
        import vtkmodules.vtkRenderingVolumeOpenGL2  # noqa: F401 - registers the mappers
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPiecewiseFunction
        from vtkmodules.vtkRenderingCore import (
            vtkColorTransferFunction,
            vtkRenderer,
            vtkRenderWindow,
            vtkRenderWindowInteractor,
            vtkVolume,
            vtkVolumeProperty,
        )
        from vtkmodules.vtkRenderingVolumeOpenGL2 import vtkSmartVolumeMapper

        data, self.stride = decimated(volume)
        image = vtkImageData()
        image.SetDimensions(data.shape[2], data.shape[1], data.shape[0])
        image.SetSpacing(self.stride, self.stride, self.stride)
        image.GetPointData().SetScalars(numpy_to_vtk(data.ravel(), deep=True))
        self._image = image
        self.mapper = vtkSmartVolumeMapper()
        self.mapper.SetInputData(image)
        self.colors = vtkColorTransferFunction()
        self.opacity = vtkPiecewiseFunction()
        prop = vtkVolumeProperty()
        prop.SetColor(self.colors)
        prop.SetScalarOpacity(self.opacity)
        prop.SetInterpolationTypeToLinear()
        self.volume = vtkVolume()
        self.volume.SetMapper(self.mapper)
        self.volume.SetProperty(prop)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.08, 0.08, 0.12)
        self.renderer.AddVolume(self.volume)
        self.window = vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.AddRenderer(self.renderer)
        self.window.SetSize(480, 480)
        self.interactor = vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.GetInteractorStyle().SetCurrentStyleToTrackballCamera()
        camera = self.renderer.GetActiveCamera()
        camera.Elevation(25)
        camera.Azimuth(30)
        self.renderer.ResetCamera()

    def set_window(self, lo: float, hi: float, max_opacity: float = 0.35) -> None:
        """Voxels below ``lo`` transparent and dark, rising to bright and ``max_opacity`` at
        ``hi``."""
        hi = hi if hi > lo else lo + 1e-6
        self.colors.RemoveAllPoints()
        self.colors.AddRGBPoint(lo, 0.1, 0.0, 0.0)
        self.colors.AddRGBPoint(lo + 0.5 * (hi - lo), 0.9, 0.4, 0.1)
        self.colors.AddRGBPoint(hi, 1.0, 1.0, 0.8)
        self.opacity.RemoveAllPoints()
        self.opacity.AddPoint(lo, 0.0)
        self.opacity.AddPoint(hi, max_opacity)
