"""Inference backends for the focus model, and the per-tile estimate built from several patches.

Backends: PyTorch (CPU, or CUDA when available), ONNX Runtime (CPU), and TensorRT through torch2trt
when it is importable (NVIDIA Jetson). `load_backend("auto", ...)` takes the fastest one present.
"""
import glob
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from wsi_autofocus.model_io import MODEL_INPUTS, MODEL_OUTPUTS, OPTICS_FEATURES, context_px
from wsi_autofocus.patches import select_patches
from wsi_autofocus.two_shot import UNKNOWN_CONDENSER, Condenser
from wsi_common.focus_metrics import brenner

BACKENDS = ("tensorrt", "torch-cuda", "onnxruntime", "torch-cpu")
# NVIDIA's device files: a discrete GPU's, or a Jetson's integrated GPU's.
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/nvhost-ctrl-gpu")


class BackendUnavailableError(RuntimeError):
    """The requested inference backend cannot run here (library missing, no GPU, no model file)."""


class FocusInputError(ValueError):
    """An image cannot be evaluated (wrong shape, dtype or size)."""


def default_model_dir() -> Path:
    """The focus model shipped with the package."""
    return Path(str(resources.files("wsi_autofocus") / "models" / "focus_resnet_small"))


def require_gpu(backend: str) -> None:
    """Raise BackendUnavailableError where no NVIDIA GPU exists, before importing torch: that import
    costs about 200 MB resident even when it then finds no CUDA device ("auto" tries the GPU first)."""
    if not any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES):
        raise BackendUnavailableError(f"{backend}: no NVIDIA GPU (none of {', '.join(GPU_DEVICE_FILES)})")


def read_model_metadata(model_dir: Path) -> dict:
    path = Path(model_dir) / "metadata.json"
    if not path.exists():
        raise BackendUnavailableError(f"no focus model in {model_dir} (metadata.json missing); "
                                      "train one with `make train-autofocus`")
    return json.loads(path.read_text())


CPU_PATCHES_PER_RUN = 32  # two tiles' patches: the largest batch whose CPU time per patch stays at its best


class TorchBackend:
    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 2):
        if device == "cuda":
            require_gpu("torch-cuda")
        import torch

        from wsi_autofocus.training import IncompatibleModelError, load_checkpoint

        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch-cuda: no CUDA device")
        torch.set_num_threads(threads)
        self.name = f"torch-{device}"
        self._torch = torch
        self.device = device
        try:
            self.model = load_checkpoint(Path(model_dir) / "model.pt").to(device).eval()
        except IncompatibleModelError as error:
            raise BackendUnavailableError(f"{self.name}: {error}") from error

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
        # Idle pool threads would spin between estimates, on cores the stitcher and the scan share
        # (bench/autofocus.py: 85 -> 48 ms of CPU per tile estimate, latency 29 -> 30 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        found = {model_input.name: model_input.shape[1:] for model_input in self.session.get_inputs()}
        expected = dict(zip(MODEL_INPUTS, ([3, patch_px, patch_px], [3, patch_px, patch_px], [len(OPTICS_FEATURES)])))
        if found["optics"] != expected["optics"]:
            # Focus models before version 6 were not told the condenser.
            raise BackendUnavailableError(
                f"onnxruntime: {path} takes {found['optics'][0]} optics columns, expected {len(OPTICS_FEATURES)} "
                f"{OPTICS_FEATURES}: it was trained by an older version: train a new one (make train-autofocus), "
                "or calibrate again from the shipped model")
        if found != expected:
            # Exports made before the context input was averaged down take the full field (2 * patch_px).
            raise BackendUnavailableError(
                f"onnxruntime: {path} takes inputs {found}, expected {expected}; re-export it from its "
                "model.pt with this version (wsi_autofocus.training.export)")
        columns = self.session.get_outputs()[0].shape[1]
        if columns != len(MODEL_OUTPUTS):
            # Focus models before version 5 answered a signed defocus and its log variance only.
            raise BackendUnavailableError(
                f"onnxruntime: {path} answers {columns} columns, expected {len(MODEL_OUTPUTS)} {MODEL_OUTPUTS}; "
                "it was trained by an older version: train a new one (make train-autofocus)")

    def predict(self, patches: np.ndarray, context: np.ndarray, optics: np.ndarray) -> np.ndarray:
        # Run in slices: a node that falls behind batches up to eight tiles (128 patches), whose activations
        # outgrow the CPU caches; per patch that took 2.4 and 1.8 ms of CPU against 1.8 and 1.6 ms in slices of
        # 32 (two runs, 2 threads), so the node fell further behind the more it batched.
        runs = [slice(start, start + CPU_PATCHES_PER_RUN)
                for start in range(0, max(len(patches), 1), CPU_PATCHES_PER_RUN)]   # one run even for no patch
        return np.concatenate([self.session.run(None, dict(zip(MODEL_INPUTS, (patches[run], context[run],
                                                                             optics[run]))))[0] for run in runs])


class TensorRTBackend:
    """torch2trt conversion of the PyTorch model, FP16, on the GPU (Jetson / desktop NVIDIA)."""
    name = "tensorrt"

    def __init__(self, model_dir: Path, patch_px: int, max_batch: int = 32):
        require_gpu("tensorrt")
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


# Physical bounds of the optics a request may give: oil immersion tops out near NA 1.5, and a specimen-plane
# pixel beyond 10 µm is a macro camera, not a microscope.
MAX_NUMERICAL_APERTURE = 1.6
MAX_PIXEL_SIZE_UM = 10.0


@dataclass(frozen=True)
class FocusResult:
    defocus_um: float          # positive: stage above focus; move z by -defocus_um to focus
    uncertainty_um: float      # one sigma of defocus_um, the side's doubt included
    sharpness: float           # normalised Brenner gradient of the whole image
    tissue_fraction: float
    patches_used: int
    latency_ms: float
    distance_um: float = 0.0              # |defocus|, whichever side
    distance_uncertainty_um: float = 0.0  # one sigma of distance_um
    above_focus_probability: float = 0.5  # that the stage is above focus (defocus > 0)


class FocusEstimator:
    """Single-shot defocus of a tile: robust aggregate over its most tissue-rich patches."""

    def __init__(self, backend, model_dir: Path | None = None, patches_per_tile: int | None = None):
        self.backend = backend
        self.metadata = read_model_metadata(Path(model_dir) if model_dir else default_model_dir())
        self.patch_px = int(self.metadata["patch_px"])
        self.field_px = context_px(self.patch_px)
        self.patches_per_tile = patches_per_tile or int(self.metadata.get("patches_per_tile", 8))
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.model_id = f"{self.metadata['name']}@{self.metadata['version']}" + (
            "+calibrated" if "calibration" in self.metadata else "")
        # Calibrated on the validation set at training time (`training.uncertainty_calibration`).
        self.log_variance_offset = 2.0 * math.log(float(self.metadata["uncertainty_scale"]))
        self.side_temperature = float(self.metadata["side_temperature"])

    def check_image(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise FocusInputError(f"image of shape {image.shape} and dtype {image.dtype}; "
                                  "expected an (H, W, 3) uint8 RGB image")
        if min(image.shape[:2]) < self.field_px:
            raise FocusInputError(f"image of {image.shape[1]}x{image.shape[0]} px is smaller than the model's "
                                  f"{self.field_px} px field (a {self.patch_px} px patch and its surroundings)")
        return image

    @staticmethod
    def check_optics(numerical_aperture: float, pixel_size_um: float) -> tuple[float, float]:
        """(NA, pixel size µm) as the model takes them; 0 = unknown. Refuses what no bright-field
        microscope has, instead of answering it with a number."""
        if not (math.isfinite(numerical_aperture) and 0.0 <= numerical_aperture <= MAX_NUMERICAL_APERTURE):
            raise FocusInputError(f"numerical aperture {numerical_aperture}; expected 0 (unknown) or up to "
                                  f"{MAX_NUMERICAL_APERTURE}")
        if not (math.isfinite(pixel_size_um) and 0.0 <= pixel_size_um <= MAX_PIXEL_SIZE_UM):
            raise FocusInputError(f"pixel size {pixel_size_um} µm; expected 0 (unknown) or up to {MAX_PIXEL_SIZE_UM} µm "
                                  "in the specimen plane")
        return float(numerical_aperture), float(pixel_size_um)

    @classmethod
    def optics_row(cls, numerical_aperture: float, pixel_size_um: float,
                   condenser: Condenser = UNKNOWN_CONDENSER) -> tuple[float, ...]:
        """The model's optics input (`OPTICS_FEATURES`) for a tile taken with these optics."""
        return cls.check_optics(numerical_aperture, pixel_size_um) + (condenser.fill, condenser.inner_fill)

    def estimate(self, image: np.ndarray, numerical_aperture: float = 0.0, pixel_size_um: float = 0.0,
                 condenser: Condenser = UNKNOWN_CONDENSER) -> FocusResult:
        """Defocus of one tile. numerical_aperture, pixel_size_um: the objective's NA and the image's
        pixel size in the specimen plane; condenser: the illumination as the scanner declares it; 0 =
        unknown (less accurate: the model then has to tell the optics from the image)."""
        return self.estimate_many([image], [(numerical_aperture, pixel_size_um)], [condenser])[0]

    def estimate_many(self, images: list[np.ndarray], optics: list[tuple[float, float]],
                      condensers: list[Condenser] | None = None) -> list[FocusResult]:
        """Estimates for several tiles with one backend call (batching when the node falls behind).
        optics: (numerical_aperture, pixel_size_um) per image, condensers: one per image (None: not known
        for any); 0 = unknown."""
        condensers = [UNKNOWN_CONDENSER] * len(images) if condensers is None else condensers
        if not len(optics) == len(condensers) == len(images):
            raise FocusInputError(f"{len(images)} images but {len(optics)} (NA, pixel size) pairs and "
                                  f"{len(condensers)} condensers")
        started = time.perf_counter()
        optics = [self.optics_row(*pair, condenser) for pair, condenser in zip(optics, condensers)]
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
            tile = aggregate(part[:, 0], part[:, 1] + self.log_variance_offset, part[:, 2] / self.side_temperature)
            results.append(FocusResult(tile.defocus_um, tile.uncertainty_um, brenner(image),
                                       selection.image_tissue_fraction, count, latency_ms, tile.distance_um,
                                       tile.distance_uncertainty_um, tile.above_focus_probability))
        return results


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


@dataclass(frozen=True)
class TileEstimate:
    defocus_um: float
    uncertainty_um: float
    distance_um: float
    distance_uncertainty_um: float
    above_focus_probability: float


def aggregate(distance_um: np.ndarray, log_variance: np.ndarray, side_logit: np.ndarray) -> TileEstimate:
    """One tile's estimate from its patches' (distance, log variance, calibrated above-focus logit).

    Distance: inverse-variance weighted median, with a one-sigma uncertainty that combines what the
    model says about each patch with how much the patches disagree (a robust spread: weighted median
    absolute deviation), so a tile whose patches contradict each other is not reported as certain,
    while one stray patch changes little. Side: the weighted mean of the patches' logits; patches of
    one tile share specimen and optics, so their evidence is not independent and is not summed.

    The signed defocus is the distance on the likelier side; its uncertainty adds to the distance's
    variance that of the side, 4 d^2 p (1 - p) (a defocus of +d or -d with probabilities p, 1 - p), so a
    tile whose side is in doubt is never reported as certain, however sure its distance is.
    """
    distance_um = np.maximum(distance_um.astype(np.float64), 0.0)
    weights = np.exp(-log_variance.astype(np.float64))
    distance = _weighted_median(distance_um, weights)
    # Patches of one tile share the specimen and the optics, so their errors are correlated:
    # the typical patch variance, not the variance of an average of independent draws.
    model_variance = 1.0 / weights.mean()
    spread = 1.4826 * _weighted_median(np.abs(distance_um - distance), weights)
    distance_variance = model_variance + spread ** 2
    logit = float(np.sum(weights * side_logit) / weights.sum())
    above = 1.0 / (1.0 + math.exp(-logit))
    defocus = distance if logit >= 0 else -distance
    uncertainty = math.sqrt(distance_variance + 4.0 * distance * distance * above * (1.0 - above))
    return TileEstimate(defocus, uncertainty, distance, math.sqrt(distance_variance), above)
