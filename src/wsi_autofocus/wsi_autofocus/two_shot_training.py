"""Data and training for the two-shot defocus model (`two_shot`).

Pairs of exposures of one field, the second a random step above the first (a "near" set at 1-3 depths of
focus around the two-shot table's fixed step, and a "wide" set log-uniform over 1-12, the steps of a
scan's side probe, which steps by the estimated distance), imaged
by the training simulators only: the virtual microscope, and microscopes drawn at random by
`training_optics` (aberrations, condenser, spectra, cameras) showing procedural tissue or re-stained
training textures. Specimens and textures are split as the single-shot model's are (`data.SPLITS`); the
held-out microscopes and real images of the evaluation never appear. Only the pairs' features are kept:
the data set of a few thousand pairs is a few megabytes and renders in minutes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus import training_optics
from wsi_autofocus.content import TRAINING_IMAGES, RestainedTexture
from wsi_autofocus.data import (SPLITS, TEXTURE_SPLITS, description, is_current, load, randomised_stack,
                                sample_fields, save_npz, specimen_for_seed, starmap_in_processes, write_description)
from wsi_autofocus.two_shot import (BAND_EDGES, FEATURE_COUNT, SUB_WINDOW_FRACTION, SUB_WINDOW_POSITIONS, TwoShotModel,
                                    depth_unit_um, label_depths, model_inputs, pair_features, sigma_temperature)

SOURCES = ("virtual-microscope", "randomised-procedural", "randomised-texture")
# What a pair file holds per pair: the features, the label and the optics that imaged the pair (the condenser as
# the fraction of the objective NA its source fills, and the inner edge of a ring source, 0 for a disc).
PAIR_COLUMNS = ("features", "defocus_um", "numerical_aperture", "condenser_fill", "condenser_inner_fill", "objective",
                "source", "sparse")


@dataclass(frozen=True)
class PairSpec:
    specimen_seeds: tuple[int, ...]
    pairs_per_specimen: int
    texture_images: tuple[str, ...]
    seed: int
    field_px: int = 256
    max_defocus_um: float = 20.0
    step_depths: tuple[float, float] = (1.0, 12.0)
    log_uniform_steps: bool = True
    objective_weights: tuple[float, ...] = (0.2, 0.6, 0.2)
    virtual_microscope_fraction: float = 0.35
    texture_fraction: float = 0.35        # of the randomised pairs
    sparse_fraction: float = 0.1          # pairs anywhere on the slide, glass included
    pairs_per_microscope: int = 8
    annular_fraction: float = 0.3         # of the random microscopes: ring illumination
    rim_weighted_fraction: float = 0.3    # of the random microscopes: pupils brighter at the rim
    sub_window_fraction: float = SUB_WINDOW_FRACTION    # `two_shot.field_window`


def _pair_sets(split: str, near_pairs: int, wide_pairs: int, ring_pairs: int, seed: int,
               suffix: str = "") -> dict[str, PairSpec]:
    seeds, textures = SPLITS[split].specimen_seeds, TEXTURE_SPLITS[split]
    wide = PairSpec(seeds, wide_pairs, textures, seed)
    # Ring illumination scales how defocus blurs (a ring of source points blurs like a wider disc), which pairs
    # must learn to tell from distance: with rings only in the wide set's share the model read their distances
    # long (validation pairs under ring-lit training microscopes: MAE 2.0 µm at 20x, other pairs 1.2).
    ring = replace(wide, pairs_per_specimen=ring_pairs, seed=seed + 100, annular_fraction=1.0,
                   virtual_microscope_fraction=0.0)
    return {f"near{suffix}": PairSpec(seeds, near_pairs, textures, seed, step_depths=(1.0, 3.0),
                                      log_uniform_steps=False),
            f"wide{suffix}": wide, f"ring{suffix}": ring}


# The data sets of each split, one file each; a split is their union. The model's error falls with the number of
# training pairs (validation pairs at 20x: three quarters of the first draw read 9 % worse, half 26 %), so the
# training split adds draws of the same sets (other seeds) at 70 % of their size: as many pairs as
# `make train-two-shot` renders within an hour here.
PAIR_SPLITS = {"train": _pair_sets("train", 300, 600, 150, seed=21)
               | _pair_sets("train", 210, 420, 105, seed=31, suffix="-2")
               | _pair_sets("train", 210, 420, 105, seed=41, suffix="-3"),
               "val": _pair_sets("val", 250, 250, 150, seed=22)}


def render_specimen_pairs(spec: PairSpec, specimen_seed: int) -> dict:
    """Features of `pairs_per_specimen` pairs on one specimen (or on textures, for a share of them)."""
    rng = np.random.default_rng([spec.seed, specimen_seed])
    microscope = VirtualMicroscope(specimen=specimen_for_seed(specimen_seed), seed=specimen_seed)
    n = spec.pairs_per_specimen
    points, sparse, objectives, defocus = sample_fields(spec, microscope, rng, n)
    step_depths = (np.exp(rng.uniform(*np.log(spec.step_depths), n)) if spec.log_uniform_steps
                   else rng.uniform(*spec.step_depths, n))
    source = np.where(rng.random(n) < spec.virtual_microscope_fraction, 0,
                      np.where(rng.random(n) < spec.texture_fraction, 2, 1))
    features = np.zeros((n, FEATURE_COUNT), np.float32)
    aperture = np.zeros(n, np.float32)
    condenser = np.zeros((n, 2), np.float32)
    side = spec.field_px
    roi = microscope.camera.centre_roi(side)
    for i in np.flatnonzero(source == 0):
        x, y = points[i]
        focal = float(microscope.focal_z_um(x, y))
        exposure = float(rng.uniform(3.0, 10.0))
        first = microscope.capture(x, y, focal + defocus[i], objectives[i], exposure_ms=exposure, roi=roi)
        step = step_depths[i] * depth_unit_um(first.numerical_aperture)
        second = microscope.capture(x, y, focal + defocus[i] + step, objectives[i], exposure_ms=exposure, roi=roi)
        defocus[i] = first.defocus_um
        aperture[i] = first.numerical_aperture
        condenser[i] = microscope.condenser_fill, 0.0
        features[i] = pair_features(first.image_rgb8, second.image_rgb8, first.numerical_aperture,
                                    first.pixel_size_um, step, spec.sub_window_fraction)
    textures = {}
    randomised = np.flatnonzero(source > 0)
    for group_start in range(0, len(randomised), spec.pairs_per_microscope):
        group = randomised[group_start:group_start + spec.pairs_per_microscope]
        optics = training_optics.sample_optics(objectives[group[0]], rng, spec.annular_fraction,
                                               spec.rim_weighted_fraction)
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
            condenser[i] = optics.condenser_fill, optics.condenser_inner_fill
            objectives[i] = optics.magnification
            features[i] = pair_features(first, second, optics.numerical_aperture, optics.pixel_size_um, step,
                                        spec.sub_window_fraction)
    return {"features": features, "defocus_um": defocus.astype(np.float32), "numerical_aperture": aperture,
            "condenser_fill": condenser[:, 0], "condenser_inner_fill": condenser[:, 1],
            "objective": objectives.astype(np.float32), "source": source.astype(np.int8), "sparse": sparse}


def _description(spec: PairSpec) -> dict:
    """What a pair file was rendered from and what it holds, as its .json beside it records it."""
    return description(spec, band_edges=BAND_EDGES.tolist(), columns=list(PAIR_COLUMNS),
                       sub_window_positions=SUB_WINDOW_POSITIONS)


def generate_pairs(spec: PairSpec, output: Path, workers: int = 2) -> Path:
    parts = starmap_in_processes(render_specimen_pairs, [(spec, seed) for seed in spec.specimen_seeds], workers)
    save_npz(output, {key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
    write_description(output, _description(spec))
    return Path(output)


def pairs_are_current(path: Path, spec: PairSpec) -> bool:
    """Whether the pair file at `path` exists and was rendered from `spec` over this version's bands, field
    windows (`two_shot.field_window`) and image formation."""
    return is_current(path, _description(spec))


def split_pairs(sets: dict[str, PairSpec], directory: Path, split: str, workers: int = 2, log=print) -> dict:
    """The pairs of one split (`PAIR_SPLITS[split]`, or variants of its sets), each set's file `<split>-<name>.npz`
    in `directory` rendered first where it is missing or stale (`pairs_are_current`), joined."""
    parts = []
    for name, spec in sets.items():
        path = Path(directory) / f"{split}-{name}.npz"
        if not pairs_are_current(path, spec):
            log(f"rendering {spec.pairs_per_specimen * len(spec.specimen_seeds)} {split} pairs into {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            generate_pairs(spec, path, workers=workers)
        parts.append(load(path))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


@dataclass(frozen=True)
class TwoShotTrainingConfig:
    members: int = 5
    hidden: int = 128
    layers: int = 3
    epochs: int = 400
    batch: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 40
    seed: int = 0
    # Of the pairs, those shown with their condenser not known, so that a scanner that does not declare its
    # condenser is read as well as before the model read it.
    unknown_condenser_fraction: float = 0.5


def _fit_member(x_train, y_train, x_val, y_val, config: TwoShotTrainingConfig, member: int, log) -> dict:
    """One perceptron fitted by Gaussian negative log-likelihood (defocus in depths of focus); the epoch
    with the best validation loss is kept. Its arrays, named as `TwoShotModel` reads them."""
    import torch

    seed = config.seed + member
    torch.manual_seed(seed)
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

    best, best_state, since_best = float("inf"), None, 0
    generator = torch.Generator().manual_seed(seed)
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
        if since_best >= config.patience:
            break
    log(f"member {member}: best validation NLL {best:.4f} after {epoch + 1} epochs")
    network.load_state_dict(best_state)
    linears = [module for module in network if isinstance(module, torch.nn.Linear)]
    arrays = {f"m{member}_w{k}": layer.weight.detach().numpy().T for k, layer in enumerate(linears[:-1])}
    arrays |= {f"m{member}_b{k}": layer.bias.detach().numpy() for k, layer in enumerate(linears[:-1])}
    return arrays | {f"m{member}_w_out": linears[-1].weight.detach().numpy().T,
                     f"m{member}_b_out": linears[-1].bias.detach().numpy(), f"m{member}_nll": np.float32(best)}


def with_model_inputs(pairs: dict, unknown_condenser_fraction: float, seed) -> dict:
    """`pairs` (as a pair file holds them) whose `features` are the model's inputs: each pair's features and its
    condenser, not known for a random `unknown_condenser_fraction` of them."""
    unknown = np.random.default_rng(seed).random(len(pairs["features"])) < unknown_condenser_fraction
    return pairs | {"features": model_inputs(pairs["features"], np.where(unknown, 0.0, pairs["condenser_fill"]),
                                             np.where(unknown, 0.0, pairs["condenser_inner_fill"]))}


def train_two_shot(train: dict, val: dict, config: TwoShotTrainingConfig = TwoShotTrainingConfig(),
                   log=print) -> TwoShotModel:
    """An ensemble of `config.members` perceptrons (seeds apart) on pair files' pairs, its sigma scaled on the
    validation pairs (`sigma_temperature`)."""
    import torch

    torch.set_num_threads(2)
    started = time.monotonic()
    train, val = (with_model_inputs(pairs, config.unknown_condenser_fraction, [config.seed, salt])
                  for pairs, salt in ((train, 0), (val, 1)))
    mean = train["features"].mean(axis=0)
    scale = np.maximum(train["features"].std(axis=0), 1e-3)

    def tensors(pairs):
        x = torch.from_numpy(((pairs["features"] - mean) / scale).astype(np.float32))
        return x, torch.from_numpy(label_depths(pairs).astype(np.float32))

    x_train, y_train = tensors(train)
    x_val, y_val = tensors(val)
    arrays = {"mean": mean, "scale": scale}
    for member in range(config.members):
        arrays |= _fit_member(x_train, y_train, x_val, y_val, config, member, log)
    model = TwoShotModel(arrays, {})
    temperature = sigma_temperature(model, val)
    model.arrays["sigma_temperature"] = np.float32(temperature)
    model.metadata = {"band_edges": BAND_EDGES.tolist(), "sub_window": [SUB_WINDOW_FRACTION, SUB_WINDOW_POSITIONS],
                      "config": asdict(config),
                      "sigma_temperature": temperature, "train_pairs": len(x_train),
                      "val_pairs": len(x_val), "train_s": round(time.monotonic() - started, 1)}
    log(f"ensemble of {config.members}: sigma scaled by {temperature:.3f}")
    return model
