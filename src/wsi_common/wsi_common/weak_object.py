"""The weak-object linearisation both simulators share (the virtual microscope and the autofocus training optics):
ROS-free and simulator-free, so the autofocus device side can import what imports it."""
import math

import numpy as np


def weak_phase(transmission: np.ndarray, path_um: np.ndarray, wavelength_um: float) -> np.ndarray:
    """The specimen term the phase transfer function images: sqrt(T) phi, the imaginary part, to first order in
    the phase phi = 2 pi path / wavelength, of the transmitted amplitude sqrt(T) exp(i phi) (T: intensity
    transmission). Weighting phi by T instead under-weights the phase of densely stained tissue and can turn its
    contrast against the stain's."""
    return np.sqrt(transmission) * (path_um * np.float32(2 * math.pi / wavelength_um))
