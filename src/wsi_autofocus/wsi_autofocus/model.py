"""ResNet focus regressor in plain torch.nn (torchvision does not install beside the CPU torch here).

The network maps one RGB patch, and the wider field around it, to the distance from focus (µm), the
log-variance of that distance, and the log-odds that the stage is above focus. Distance and side are
separate outputs because they are known separately: blur shows how far from focus an image is on any
microscope, while which side it is on shows only through cues (phase contrast, aberrations) that
differ between microscopes and specimens. A Gaussian negative log-likelihood on the distance makes the
model say how unsure it is (large on empty or sparse fields); the side is a logistic output whose
confidence falls where the cues are missing.

Besides a ResNet on the patch's pixels, spectral branches see each channel's radially averaged log
power spectrum, of the patch and of its surroundings: above and below focus the objective's
aberrations put the zeros of the transfer function at different frequencies, a cue that is
independent of the specimen and that a CNN on pixels finds only slowly. The spectrum is computed
with fixed DFT matrices (plain matrix products), so the model exports to ONNX and TensorRT unchanged.
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from wsi_autofocus.model_io import MODEL_OUTPUTS, OPTICS_FEATURES


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks_per_stage: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURES = {
    "resnet18": Architecture("resnet18", (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet34": Architecture("resnet34", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    # Same residual design, narrower and shallower: fast enough for inline use on a CPU or a Jetson.
    "resnet_small": Architecture("resnet_small", (1, 1, 2, 1), (16, 32, 64, 128), 16),
}


class UnknownArchitectureError(ValueError):
    pass


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown focus model architecture {name!r}; expected one of {sorted(ARCHITECTURES)}") from None


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class RadialLogSpectrum(nn.Module):
    """(N, C, P, P) patches -> (N, C, bins) log power, radially averaged up to the Nyquist frequency.

    The power spectrum of a real image is point-symmetric, so only the rows 0..P/2 of the DFT are
    computed (half the matrix products), each row weighted by how many rows of the full plane it stands for."""

    def __init__(self, patch_px: int, bins: int = 32):
        super().__init__()
        n = torch.arange(patch_px, dtype=torch.float64)
        half_rows = torch.arange(patch_px // 2 + 1, dtype=torch.float64)
        angle = 2 * math.pi * torch.outer(n, n) / patch_px
        half_angle = 2 * math.pi * torch.outer(half_rows, n) / patch_px
        self.register_buffer("cos", torch.cos(angle).float())
        self.register_buffer("sin", torch.sin(angle).float())
        self.register_buffer("cos_rows", torch.cos(half_angle).float())
        self.register_buffer("sin_rows", torch.sin(half_angle).float())
        window = torch.hann_window(patch_px, periodic=False, dtype=torch.float64)
        self.register_buffer("window", torch.outer(window, window).float())
        frequency = torch.fft.fftfreq(patch_px, dtype=torch.float64)
        radius = torch.sqrt(frequency[:len(half_rows), None] ** 2 + frequency[None, :] ** 2) / 0.5
        index = torch.clamp((radius * bins).long(), max=bins)            # bin `bins`: beyond Nyquist
        # Row k also stands for row -k, except row 0 and (P even) the Nyquist row, which are their own mirror.
        mirrored = torch.full((len(half_rows), 1), 2.0, dtype=torch.float64)
        mirrored[0] = 1.0
        if patch_px % 2 == 0:
            mirrored[-1] = 1.0
        weights = torch.nn.functional.one_hot(index.flatten(), bins + 1)[:, :bins].double()
        weights = weights * mirrored.expand(-1, patch_px).reshape(-1, 1)
        self.register_buffer("binning", (weights / weights.sum(0).clamp_min(1)).float())

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = (patches - patches.mean(dim=(2, 3), keepdim=True)) * self.window
        real = self.cos_rows @ x @ self.cos - self.sin_rows @ x @ self.sin
        imaginary = self.sin_rows @ x @ self.cos + self.cos_rows @ x @ self.sin
        power = (real * real + imaginary * imaginary).flatten(2)
        return torch.log(power @ self.binning + 1e-6)


def _mean_normalised(images: torch.Tensor) -> torch.Tensor:
    """Each image divided by its own mean, minus 1: exposure drops out, contrast (a defocus cue) stays."""
    return images / images.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3) - 1.0


class FocusRegressor(nn.Module):
    """ResNet on the patch + spectra of the patch and of its surroundings -> MODEL_OUTPUTS.

    Inputs: `patches`, float (N, 3, P, P), RGB in [0, 1], P = patch_px; `context`, float (N, 3, P, P):
    the field of context_px(P) px around each patch (the patch lies anywhere inside it), averaged
    down CONTEXT_FACTOR times (`wsi_autofocus.patches.downsampled_fields`); `optics`, float (N, 4):
    the objective's numerical aperture, the image pixel size in µm and the condenser's outer and inner
    fill (OPTICS_FEATURES), 0 where unknown.

    Near focus the defocus lives in the finest detail of the patch, which the ResNet and the patch's
    spectrum read. Far from focus the blur disc is as wide as the patch (at 20x/0.75 a 96 px patch
    is 31 µm; the blur at 10 µm defocus is ~22 µm across) and the transfer function's first zeros
    fall into the lowest frequency bins of a patch spectrum, so the context field, averaged down to
    P px before it reaches the network, adds a spectrum over a field twice as wide: twice the
    frequency resolution where far defocus shows. A ResNet on the context as well made a training
    step 1.45x slower and, in equal training time, read 20x validation tiles less well (MAE within
    ±20 µm 0.68 against 0.57 µm, measured). The same blur means 2.7x less defocus at 40x/0.95 than
    at 20x/0.75 and the same pixels cover a different field, so the head is conditioned on the
    optics; and the blur of an absorber is the shadow of the illumination cone, so on the condenser
    too. Training drops them now and then so that "unknown" (0) still gets an answer. Every view
    is divided by its own mean inside the network, so exposure does not shift the answer and the
    exported ONNX/TorchScript models take raw [0, 1] pixels.
    """

    def __init__(self, arch: Architecture, patch_px: int, defocus_scale_um: float = 10.0, spectrum_bins: int = 32):
        super().__init__()
        self.arch = arch
        self.patch_px = patch_px
        self.defocus_scale_um = defocus_scale_um
        self.spectrum = RadialLogSpectrum(patch_px, spectrum_bins)

        def spectral_features():
            return nn.Sequential(nn.Linear(3 * spectrum_bins, 96), nn.ReLU(inplace=True),
                                 nn.Linear(96, 64), nn.ReLU(inplace=True))

        self.patch_spectral_features = spectral_features()
        self.context_spectral_features = spectral_features()
        # The first layer keeps full resolution: near focus, defocus lives in the finest spatial frequencies.
        self.stem = nn.Sequential(
            nn.Conv2d(3, arch.stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(arch.stem_width),
            nn.ReLU(inplace=True), nn.Conv2d(arch.stem_width, arch.stem_width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(arch.stem_width), nn.ReLU(inplace=True))
        stages, in_channels = [], arch.stem_width
        for stage_index, (blocks, width) in enumerate(zip(arch.blocks_per_stage, arch.widths)):
            for block_index in range(blocks):
                stride = 2 if block_index == 0 and stage_index > 0 else 1
                stages.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.optics_features = nn.Sequential(nn.Linear(len(OPTICS_FEATURES), 16), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(in_channels + 2 * 64 + 16, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, len(MODEL_OUTPUTS)))
        # Training only: a head on the patch alone that regresses the signed defocus (mean, log variance), as
        # focus model v4 did. Its loss keeps the ResNet reading the finest detail near focus, where the context
        # spectrum adds nothing, and gives the features of the side of focus the strong gradient a wrong
        # side costs in a regression (twice the distance); inference uses `head`.
        self.near_head = nn.Sequential(nn.Linear(in_channels + 64 + 16, 96), nn.ReLU(inplace=True), nn.Linear(96, 2))

    def _views(self, patches: torch.Tensor, context: torch.Tensor, optics: torch.Tensor):
        patch = _mean_normalised(patches)
        surroundings = _mean_normalised(context)
        return (self.pool(self.stages(self.stem(patch))).flatten(1),
                self.patch_spectral_features(self.spectrum(patch).flatten(1)),
                self.context_spectral_features(self.spectrum(surroundings).flatten(1)),
                self.optics_features(optics))

    def _estimate(self, raw: torch.Tensor) -> torch.Tensor:
        log_variance = raw[:, 1].clamp(-8.0, 10.0) + 2.0 * math.log(self.defocus_scale_um)
        return torch.stack([raw[:, 0] * self.defocus_scale_um, log_variance, raw[:, 2]], dim=1)

    def _full_estimate(self, views: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._estimate(self.head(torch.cat(views, dim=1)))

    def forward(self, patches: torch.Tensor, context: torch.Tensor, optics: torch.Tensor) -> torch.Tensor:
        """(N, 3): MODEL_OUTPUTS, from every view."""
        return self._full_estimate(self._views(patches, context, optics))

    def forward_with_near_head(self, patches: torch.Tensor, context: torch.Tensor, optics: torch.Tensor) -> torch.Tensor:
        """(N, 5): `forward`'s estimate, then the signed defocus and log variance of the training-only head
        that sees the patch alone."""
        views = self._views(patches, context, optics)
        spatial, patch_spectral, _, optics_features = views
        raw = self.near_head(torch.cat([spatial, patch_spectral, optics_features], dim=1))
        near = torch.stack([raw[:, 0] * self.defocus_scale_um,
                            raw[:, 1].clamp(-8.0, 10.0) + 2.0 * math.log(self.defocus_scale_um)], dim=1)
        return torch.cat([self._full_estimate(views), near], dim=1)


def build_model(name: str, patch_px: int) -> FocusRegressor:
    return FocusRegressor(architecture(name), patch_px)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
