"""Data and training for the two-shot defocus model (`two_shot`).

Pairs of exposures of one field, the second a random step (1-12 depths of focus, log-uniform: the
two-shot table's fixed step and a scan's side probe, which steps by the estimated distance) above the first, imaged
by the training simulators only: the virtual microscope, and microscopes drawn at random by
`training_optics` (aberrations, condenser, spectra, cameras) showing procedural tissue or re-stained
training textures. Specimens and textures are split as the single-shot model's are (`data.SPLITS`); the
held-out microscopes and real images of the evaluation never appear. Only the pairs' features are kept:
the data set of a few thousand pairs is a few megabytes and renders in minutes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus import training_optics
from wsi_autofocus.content import TRAINING_IMAGES, RestainedTexture
from wsi_autofocus.data import (OBJECTIVES, SPLITS, TEXTURE_SPLITS, randomised_stack, save_npz, specimen_for_seed,
                                starmap_in_processes, tissue_points)
from wsi_autofocus.two_shot import FEATURE_COUNT, TwoShotModel, depth_unit_um, pair_features

SOURCES = ("virtual-microscope", "randomised-procedural", "randomised-texture")


@dataclass(frozen=True)
class PairSpec:
    specimen_seeds: tuple[int, ...]
    pairs_per_specimen: int
    texture_images: tuple[str, ...]
    seed: int
    field_px: int = 256
    max_defocus_um: float = 20.0
    step_depths: tuple[float, float] = (1.0, 12.0)      # log-uniform
    objective_weights: tuple[float, ...] = (0.2, 0.6, 0.2)
    virtual_microscope_fraction: float = 0.35
    texture_fraction: float = 0.35        # of the randomised pairs
    sparse_fraction: float = 0.1          # pairs anywhere on the slide, glass included
    pairs_per_microscope: int = 8


PAIR_SPLITS = {
    "train": PairSpec(SPLITS["train"].specimen_seeds, 600, TEXTURE_SPLITS["train"], seed=21),
    "val": PairSpec(SPLITS["val"].specimen_seeds, 250, TEXTURE_SPLITS["val"], seed=22),
}


def render_specimen_pairs(spec: PairSpec, specimen_seed: int) -> dict:
    """Features of `pairs_per_specimen` pairs on one specimen (or on textures, for a share of them)."""
    rng = np.random.default_rng([spec.seed, specimen_seed])
    microscope = VirtualMicroscope(specimen=specimen_for_seed(specimen_seed), seed=specimen_seed)
    n = spec.pairs_per_specimen
    points = tissue_points(microscope, rng, n)
    sparse = rng.random(n) < spec.sparse_fraction
    points[sparse] = np.column_stack([rng.uniform(0.1, 0.9, sparse.sum()) * microscope.specimen.width_um,
                                      rng.uniform(0.1, 0.9, sparse.sum()) * microscope.specimen.height_um])
    objectives = rng.choice(OBJECTIVES, size=n, p=np.array(spec.objective_weights) / sum(spec.objective_weights))
    near = rng.random(n) < 0.5
    defocus = np.where(near, rng.uniform(-10, 10, n), rng.uniform(-spec.max_defocus_um, spec.max_defocus_um, n))
    step_depths = np.exp(rng.uniform(*np.log(spec.step_depths), n))
    source = np.where(rng.random(n) < spec.virtual_microscope_fraction, 0,
                      np.where(rng.random(n) < spec.texture_fraction, 2, 1))
    features = np.zeros((n, FEATURE_COUNT), np.float32)
    aperture = np.zeros(n, np.float32)
    camera = microscope.camera
    side = spec.field_px
    roi = ((camera.height_px - side) // 2, (camera.width_px - side) // 2, side, side)
    for i in np.flatnonzero(source == 0):
        x, y = points[i]
        focal = float(microscope.focal_z_um(x, y))
        exposure = float(rng.uniform(3.0, 10.0))
        first = microscope.capture(x, y, focal + defocus[i], objectives[i], exposure_ms=exposure, roi=roi)
        step = step_depths[i] * depth_unit_um(first.numerical_aperture)
        second = microscope.capture(x, y, focal + defocus[i] + step, objectives[i], exposure_ms=exposure, roi=roi)
        defocus[i] = first.defocus_um
        aperture[i] = first.numerical_aperture
        features[i] = pair_features(first.image_rgb8, second.image_rgb8, first.numerical_aperture,
                                    first.pixel_size_um, step)
    textures = {}
    randomised = np.flatnonzero(source > 0)
    for group_start in range(0, len(randomised), spec.pairs_per_microscope):
        group = randomised[group_start:group_start + spec.pairs_per_microscope]
        optics = training_optics.sample_optics(objectives[group[0]], rng)
        focus_shift = training_optics.best_focus_shift_um(optics)
        for i in group:
            if source[i] == 2:
                name = spec.texture_images[int(rng.integers(len(spec.texture_images)))]
                if name not in textures:
                    textures[name] = RestainedTexture(TRAINING_IMAGES[name])
                specimen, x, y = textures[name].draw(rng)
            else:
                specimen, (x, y) = microscope.specimen, points[i]
            step = step_depths[i] * depth_unit_um(optics.numerical_aperture)
            first, second = randomised_stack(specimen, x, y, optics, focus_shift, (defocus[i], defocus[i] + step),
                                             side, rng)
            aperture[i] = optics.numerical_aperture
            objectives[i] = optics.magnification
            features[i] = pair_features(first, second, optics.numerical_aperture, optics.pixel_size_um, step)
    return {"features": features, "defocus_um": defocus.astype(np.float32), "numerical_aperture": aperture,
            "objective": objectives.astype(np.float32), "source": source.astype(np.int8), "sparse": sparse}


def generate_pairs(spec: PairSpec, output: Path, workers: int = 2) -> Path:
    parts = starmap_in_processes(render_specimen_pairs, [(spec, seed) for seed in spec.specimen_seeds], workers)
    save_npz(output, {key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
    Path(output).with_suffix(".json").write_text(json.dumps(asdict(spec), indent=1))
    return Path(output)


@dataclass(frozen=True)
class TwoShotTrainingConfig:
    hidden: int = 64
    layers: int = 2
    epochs: int = 400
    batch: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 40
    seed: int = 0


def _depths(pairs: dict) -> np.ndarray:
    return pairs["defocus_um"] / depth_unit_um(pairs["numerical_aperture"])


def train_two_shot(train: dict, val: dict, config: TwoShotTrainingConfig = TwoShotTrainingConfig(),
                   log=print) -> TwoShotModel:
    """A perceptron fitted by Gaussian negative log-likelihood of the first exposure's defocus in depths
    of focus; the epoch with the best validation loss is kept and its sigma scaled on the validation set."""
    import torch

    torch.manual_seed(config.seed)
    torch.set_num_threads(2)
    mean = train["features"].mean(axis=0)
    scale = np.maximum(train["features"].std(axis=0), 1e-3)

    def tensors(pairs):
        x = torch.from_numpy(((pairs["features"] - mean) / scale).astype(np.float32))
        return x, torch.from_numpy(_depths(pairs).astype(np.float32))

    x_train, y_train = tensors(train)
    x_val, y_val = tensors(val)
    blocks, width = [], x_train.shape[1]
    for _ in range(config.layers):
        blocks += [torch.nn.Linear(width, config.hidden), torch.nn.ReLU()]
        width = config.hidden
    network = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 2))
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.epochs)

    def loss_of(x, y):
        output = network(x)
        log_variance = output[:, 1].clamp(-8, 8)
        return (0.5 * (log_variance + (output[:, 0] - y) ** 2 / log_variance.exp())).mean()

    best, best_state, since_best, started = float("inf"), None, 0, time.monotonic()
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        network.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(config.batch):
            optimiser.zero_grad()
            loss_of(x_train[batch], y_train[batch]).backward()
            optimiser.step()
        schedule.step()
        network.eval()
        with torch.no_grad():
            val_loss = float(loss_of(x_val, y_val))
        if val_loss < best:
            best, best_state, since_best = val_loss, {k: v.clone() for k, v in network.state_dict().items()}, 0
        else:
            since_best += 1
        if epoch % 20 == 0 or since_best == 0 and epoch > config.epochs - 5:
            log(f"epoch {epoch}: validation NLL {val_loss:.4f} (best {best:.4f})")
        if since_best >= config.patience:
            break
    network.load_state_dict(best_state)
    linears = [module for module in network if isinstance(module, torch.nn.Linear)]
    arrays = {f"w{k}": layer.weight.detach().numpy().T for k, layer in enumerate(linears[:-1])}
    arrays |= {f"b{k}": layer.bias.detach().numpy() for k, layer in enumerate(linears[:-1])}
    arrays |= {"w_out": linears[-1].weight.detach().numpy().T, "b_out": linears[-1].bias.detach().numpy(),
               "mean": mean, "scale": scale}
    model = TwoShotModel(arrays, {})
    predicted, sigma = model.predict_depths(val["features"])
    temperature = float(np.sqrt(np.mean(((predicted - _depths(val)) / sigma) ** 2)))
    # A scaled sigma is the same as shifting the log variance by 2 log(temperature).
    model.arrays["b_out"][1] += 2 * np.log(temperature)
    model.metadata = {"config": asdict(config), "sigma_temperature": temperature, "train_pairs": len(x_train),
                      "val_pairs": len(x_val), "best_val_nll": best, "epochs_run": epoch + 1,
                      "train_s": round(time.monotonic() - started, 1)}
    log(f"best validation NLL {best:.4f}; sigma scaled by {temperature:.3f}")
    return model
