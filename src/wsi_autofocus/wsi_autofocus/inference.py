"""Inference backends for the focus model, and the per-tile estimate built from several patches.

Backends: PyTorch (CPU, or CUDA when available), ONNX Runtime (CPU), and TensorRT through torch2trt
when it is importable (NVIDIA Jetson). `load_backend("auto", ...)` takes the fastest one present.
"""
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from wsi_acquisition.focus import brenner
from wsi_autofocus.model_io import MODEL_INPUTS, OPTICS_FEATURES, context_px
from wsi_autofocus.patches import select_patches

BACKENDS = ("tensorrt", "torch-cuda", "onnxruntime", "torch-cpu")


class BackendUnavailableError(RuntimeError):
    """The requested inference backend cannot run here (library missing, no GPU, no model file)."""


class FocusInputError(ValueError):
    """An image cannot be evaluated (wrong shape, dtype or size)."""


def default_model_dir() -> Path:
    """The focus model shipped with the package."""
    return Path(str(resources.files("wsi_autofocus") / "models" / "focus_resnet_small"))


def read_model_metadata(model_dir: Path) -> dict:
    path = Path(model_dir) / "metadata.json"
    if not path.exists():
        raise BackendUnavailableError(f"no focus model in {model_dir} (metadata.json missing); "
                                      "train one with `make train-autofocus`")
    return json.loads(path.read_text())


class TorchBackend:
    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 2):
        import torch

        from wsi_autofocus.training import load_checkpoint

        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch-cuda: no CUDA device")
        torch.set_num_threads(threads)
        self.name = f"torch-{device}"
        self._torch = torch
        self.device = device
        self.model = load_checkpoint(Path(model_dir) / "model.pt").to(device).eval()

    def predict(self, patches: np.ndarray, context: np.ndarray, optics: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            inputs = [self._torch.from_numpy(array).to(self.device) for array in (patches, context, optics)]
            return self.model(*inputs).float().cpu().numpy()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_dir: Path, patch_px: int, threads: int = 2):
        try:
            import onnxruntime
        except ImportError as error:
            raise BackendUnavailableError(f"onnxruntime: {error}") from error
        path = Path(model_dir) / "model.onnx"
        if not path.exists():
            raise BackendUnavailableError(f"onnxruntime: {path} missing")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        found = {model_input.name: model_input.shape[1:] for model_input in self.session.get_inputs()}
        expected = dict(zip(MODEL_INPUTS, ([3, patch_px, patch_px], [3, patch_px, patch_px], [len(OPTICS_FEATURES)])))
        if found != expected:
            # Exports made before the context input was averaged down take the full field (2 * patch_px).
            raise BackendUnavailableError(
                f"onnxruntime: {path} takes inputs {found}, expected {expected}; re-export it from its "
                "model.pt with this version (wsi_autofocus.training.export)")

    def predict(self, patches: np.ndarray, context: np.ndarray, optics: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(MODEL_INPUTS, (patches, context, optics))))[0]


class TensorRTBackend:
    """torch2trt conversion of the PyTorch model, FP16, on the GPU (Jetson / desktop NVIDIA)."""
    name = "tensorrt"

    def __init__(self, model_dir: Path, patch_px: int, max_batch: int = 32):
        try:
            import torch
            from torch2trt import torch2trt
        except ImportError as error:
            raise BackendUnavailableError(f"tensorrt: torch2trt not importable ({error})") from error
        if not torch.cuda.is_available():
            raise BackendUnavailableError("tensorrt: no CUDA device")
        from wsi_autofocus.training import load_checkpoint, model_example_inputs

        self._torch = torch
        model = load_checkpoint(Path(model_dir) / "model.pt").cuda().eval()
        self.model = torch2trt(model, list(model_example_inputs(patch_px, "cuda")), fp16_mode=True,
                               max_batch_size=max_batch)

    def predict(self, patches: np.ndarray, context: np.ndarray, optics: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            inputs = [self._torch.from_numpy(array).cuda() for array in (patches, context, optics)]
            return self.model(*inputs).float().cpu().numpy()


def load_backend(name: str, model_dir: Path | None = None, threads: int = 2):
    """Load one backend by name, or with "auto" the first of BACKENDS that works here.

    Returns (backend, reasons): `reasons` says why each faster backend was skipped.
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    metadata = read_model_metadata(model_dir)
    candidates = BACKENDS if name == "auto" else (name,)
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown autofocus backend {name!r}; expected 'auto' or one of {BACKENDS}")
    reasons = []
    for candidate in candidates:
        try:
            if candidate == "tensorrt":
                return TensorRTBackend(model_dir, metadata["patch_px"]), reasons
            if candidate == "onnxruntime":
                return OnnxRuntimeBackend(model_dir, metadata["patch_px"], threads), reasons
            return TorchBackend(model_dir, candidate.removeprefix("torch-"), threads), reasons
        except BackendUnavailableError as error:
            reasons.append(str(error))
    raise BackendUnavailableError("; ".join(reasons))


@dataclass(frozen=True)
class FocusResult:
    defocus_um: float          # positive: stage above focus; move z by -defocus_um to focus
    uncertainty_um: float      # one sigma
    sharpness: float           # normalised Brenner gradient of the whole image
    tissue_fraction: float
    patches_used: int
    latency_ms: float


class FocusEstimator:
    """Single-shot defocus of a tile: robust aggregate over its most tissue-rich patches."""

    def __init__(self, backend, model_dir: Path | None = None, patches_per_tile: int | None = None):
        self.backend = backend
        self.metadata = read_model_metadata(Path(model_dir) if model_dir else default_model_dir())
        self.patch_px = int(self.metadata["patch_px"])
        self.field_px = context_px(self.patch_px)
        self.patches_per_tile = patches_per_tile or int(self.metadata.get("patches_per_tile", 8))
        self.model_id = f"{self.metadata['name']}@{self.metadata['version']}"
        # Calibrated on the validation specimens at training time (`training.uncertainty_scale`).
        self.log_variance_offset = 2.0 * math.log(float(self.metadata["uncertainty_scale"]))

    def check_image(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise FocusInputError(f"image of shape {image.shape} and dtype {image.dtype}; "
                                  "expected an (H, W, 3) uint8 RGB image")
        if min(image.shape[:2]) < self.field_px:
            raise FocusInputError(f"image of {image.shape[1]}x{image.shape[0]} px is smaller than the model's "
                                  f"{self.field_px} px field (a {self.patch_px} px patch and its surroundings)")
        return image

    def estimate(self, image: np.ndarray, numerical_aperture: float = 0.0, pixel_size_um: float = 0.0) -> FocusResult:
        """Defocus of one tile. numerical_aperture, pixel_size_um: the objective's NA and the image's
        pixel size in the specimen plane; 0 = unknown (less accurate: the model then has to tell the
        objective from the image)."""
        return self.estimate_many([image], [(numerical_aperture, pixel_size_um)])[0]

    def estimate_many(self, images: list[np.ndarray], optics: list[tuple[float, float]]) -> list[FocusResult]:
        """Estimates for several tiles with one backend call (batching when the node falls behind).
        optics: (numerical_aperture, pixel_size_um) per image, 0 = unknown."""
        if len(optics) != len(images):
            raise FocusInputError(f"{len(images)} images but {len(optics)} (NA, pixel size) pairs")
        started = time.perf_counter()
        images = [self.check_image(image) for image in images]
        selections = [select_patches(image, self.patch_px, self.patches_per_tile) for image in images]
        optics_rows = np.concatenate([np.tile(np.array(pair, np.float32), (len(selection.patches), 1))
                                      for pair, selection in zip(optics, selections)])
        outputs = self.backend.predict(np.concatenate([selection.patches for selection in selections]),
                                       np.concatenate([selection.context for selection in selections]), optics_rows)
        latency_ms = (time.perf_counter() - started) * 1e3
        results, start = [], 0
        for image, selection in zip(images, selections):
            count = len(selection.patches)
            part = outputs[start:start + count]
            start += count
            defocus, uncertainty = aggregate(part[:, 0], part[:, 1] + self.log_variance_offset)
            results.append(FocusResult(defocus, uncertainty, brenner(image), selection.image_tissue_fraction,
                                       count, latency_ms))
        return results


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def aggregate(defocus_um: np.ndarray, log_variance: np.ndarray) -> tuple[float, float]:
    """Inverse-variance weighted median of patch predictions, and a one-sigma uncertainty.

    The uncertainty combines what the model says about each patch with how much the patches
    disagree (a robust spread: weighted median absolute deviation), so a tile whose patches
    contradict each other is not reported as certain, while one stray patch changes little.
    """
    defocus_um = defocus_um.astype(np.float64)
    weights = np.exp(-log_variance.astype(np.float64))
    median = _weighted_median(defocus_um, weights)
    # Patches of one tile share the specimen and the optics, so their errors are correlated:
    # the typical patch variance, not the variance of an average of independent draws.
    model_variance = 1.0 / weights.mean()
    spread = 1.4826 * _weighted_median(np.abs(defocus_um - median), weights)
    return median, float(np.sqrt(model_variance + spread ** 2))
