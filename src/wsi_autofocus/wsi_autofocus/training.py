"""Training the focus regressor: dataset with focus-preserving augmentation, AdamW + ReduceLROnPlateau, a moving
average of the weights, early stopping, seeded; checkpoints and ONNX / TorchScript export."""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from wsi_autofocus.model import Architecture, FocusRegressor, build_model
from wsi_autofocus.model_io import (CONDENSER_COLUMNS, CONTEXT_FACTOR, MODEL_INPUTS, MODEL_OUTPUTS, OPTICS_FEATURES,
                                   UNKNOWN_CONDENSER_FRACTION, UNKNOWN_OPTICS_FRACTION, context_px)

MODEL_NAME = "focus_resnet_small"
MODEL_VERSION = "6"


class InlineFocusDataset(Dataset):
    """Rendered fields, their optics (`OPTICS_FEATURES`) and signed defocus labels (µm), served as
    (patch, context, optics, label) with augmentations that keep the focus ordering.

    The patch view is a `patch_px` crop of the field, centred for evaluation and anywhere in the
    field for training, as a tile's patches lie anywhere in their context window
    (`wsi_autofocus.patches.context_corner`); the context view is the whole field averaged down
    CONTEXT_FACTOR times, as `wsi_autofocus.patches.downsampled_fields` makes it at inference. Flips
    and 90° rotations, intensity (exposure), per-channel gain (stain colour) and a mild contrast
    jitter around the field mean: none of them blur or sharpen, so the label stays true. A fraction
    `unknown_optics_fraction` of augmented samples has its optics set to 0 (unknown), as a caller
    that does not know its objective sends them, and a further `unknown_condenser_fraction` only their
    condenser, as a scanner that declares none sends it.

    Indexed by an int it gives one sample; by a sequence of ints (a `BatchSampler` with
    `DataLoader(batch_size=None)`) a whole batch, augmented with tensor operations: per sample in
    numpy, the augmentation of 192 px fields cost a quarter of a training step (measured).
    """

    def __init__(self, fields: np.ndarray, optics: np.ndarray, defocus_um: np.ndarray, patch_px: int,
                 augment: bool, seed: int = 0, unknown_optics_fraction: float = UNKNOWN_OPTICS_FRACTION,
                 unknown_condenser_fraction: float = UNKNOWN_CONDENSER_FRACTION):
        if not len(fields) == len(optics) == len(defocus_um):
            raise ValueError(f"{len(fields)} fields, {len(optics)} optics rows and {len(defocus_um)} labels; "
                             "expected one of each per sample")
        if fields.shape[1:3] != (context_px(patch_px),) * 2:
            raise ValueError(f"fields of {fields.shape[2]}x{fields.shape[1]} px; a {patch_px} px model expects "
                             f"{context_px(patch_px)} px fields (render the data with the same patch_px)")
        self.fields = fields
        self.patch_px = patch_px
        self.optics = optics.astype(np.float32)
        self.unknown_optics_fraction = unknown_optics_fraction
        self.unknown_condenser_fraction = unknown_condenser_fraction
        self.defocus_um = defocus_um.astype(np.float32)
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return tuple(part[0] for part in self[[index]])
        index = np.asarray(index)
        context = torch.from_numpy(self.fields[index]).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        optics = torch.from_numpy(self.optics[index])
        count, margin = len(index), context.shape[-1] - self.patch_px
        corners = np.full((count, 2), margin // 2)
        if self.augment:
            context, optics, corners = self._augment(context, optics, margin)
        patches = torch.stack([field[:, top:top + self.patch_px, left:left + self.patch_px]
                               for field, (top, left) in zip(context, corners)])
        context = nn.functional.avg_pool2d(context, CONTEXT_FACTOR)
        return patches, context, optics, torch.from_numpy(self.defocus_um[index])

    def _augment(self, context: torch.Tensor, optics: torch.Tensor, margin: int):
        rng, count = self.rng, len(context)
        rotations, flips = rng.integers(4, size=count), rng.random(count) < 0.5
        turned = torch.empty_like(context)
        for rotation in range(4):
            for flip in (False, True):
                chosen = torch.from_numpy(np.flatnonzero((rotations == rotation) & (flips == flip)))
                if len(chosen):
                    view = torch.rot90(context[chosen], rotation, dims=(2, 3))
                    turned[chosen] = view.flip(3) if flip else view
        mean = turned.mean(dim=(1, 2, 3), keepdim=True)
        contrast = torch.from_numpy(rng.uniform(0.9, 1.1, (count, 1, 1, 1)).astype(np.float32))
        gain = torch.from_numpy((rng.uniform(0.8, 1.2, (count, 1, 1, 1)) *
                                 rng.uniform(0.93, 1.07, (count, 3, 1, 1))).astype(np.float32))
        augmented = ((turned - mean) * contrast + mean).mul_(gain).clamp_(0.0, 1.0)
        draw = rng.random(count)
        condenser_columns = np.zeros(len(OPTICS_FEATURES), bool)
        condenser_columns[CONDENSER_COLUMNS] = True
        condenser_unknown = draw < self.unknown_optics_fraction + self.unknown_condenser_fraction
        zeroed = (draw < self.unknown_optics_fraction)[:, None] | (condenser_unknown[:, None] & condenser_columns)
        optics = torch.where(torch.from_numpy(zeroed), torch.zeros_like(optics), optics)
        return augmented, optics, rng.integers(0, margin + 1, size=(count, 2))


def optics_columns(data: dict) -> np.ndarray:
    """(N, len(OPTICS_FEATURES)) model optics input of a rendered data set (`wsi_autofocus.model_io`)."""
    return np.column_stack([data[name] for name in OPTICS_FEATURES]).astype(np.float32)


# The side of focus weighs in the loss in proportion to the distance from focus (a move to the wrong
# side costs twice the distance), from 0 at focus up to SIDE_WEIGHT_CAP_UM; the side counts as defined
# beyond SIDE_WEIGHT_DISTANCE_UM (within a fraction of the depth of field it hardly shows).
SIDE_WEIGHT_DISTANCE_UM = 1.0
SIDE_WEIGHT_CAP_UM = 10.0


def focus_loss(output: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Loss of one head's (distance, log variance, above-focus logit) against signed defocus labels.

    Distance: heteroscedastic Gaussian negative log-likelihood, each sample's term weighted by its
    predicted variance to the power `beta` (held constant: "β-NLL", Seitzer et al., ICLR 2022), plus
    an L1 term. In a plain NLL the mean's gradient is error / variance, so the model learns to call
    hard fields (sparse IHC staining, tissue edges, far defocus) uncertain and stops fitting them;
    β = 0.5 keeps them in the fit. The L1 term keeps the distance sharp where the model would
    otherwise buy a low loss with a large variance. Side: binary cross-entropy of the logit, weighted
    by min(distance, SIDE_WEIGHT_CAP_UM) in µm."""
    distance, log_variance, logit = output[:, 0], output[:, 1], output[:, 2]
    true_distance = target.abs()
    nll = 0.5 * (log_variance + (true_distance - distance) ** 2 / log_variance.exp())
    weight = (beta * log_variance).exp().detach()
    side = nn.functional.binary_cross_entropy_with_logits(logit, (target > 0).float(), reduction="none")
    side_weight = true_distance.clamp(max=SIDE_WEIGHT_CAP_UM)
    return (weight * nll).mean() + 0.2 * (true_distance - distance).abs().mean() + (side_weight * side).mean()


def signed_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood of a signed-defocus (mean, log variance) head, plus 0.2 x L1."""
    mean, log_variance = output[:, 0], output[:, 1]
    nll = 0.5 * (log_variance + (target - mean) ** 2 / log_variance.exp())
    return nll.mean() + 0.2 * (target - mean).abs().mean()


def training_loss(outputs: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """`focus_loss` of the model's estimate (`FocusRegressor.forward_with_near_head` columns 0-2) plus the
    `signed_loss` of the patch-only near-focus head (columns 3-4). That head kept the ResNet reading the
    finest detail (focus model v4: held-out 20x tiles 0.22 / 0.57 µm MAE within ±10 / ±20 µm with it,
    0.36 / 0.65 µm without), and its signed regression teaches the side of focus faster than the
    main head's cross-entropy alone."""
    return focus_loss(outputs[:, :3], target, beta) + signed_loss(outputs[:, 3:], target)


def signed_defocus(output: torch.Tensor) -> torch.Tensor:
    """The most likely signed defocus of (distance, log variance, logit) rows: distance on the likelier side."""
    return torch.where(output[:, 2] >= 0, output[:, 0], -output[:, 0])


@dataclass
class TrainingConfig:
    architecture: str = "resnet_small"
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    lr_patience: int = 2
    early_stopping_patience: int = 6
    time_budget_s: float = 2400.0        # no epoch is started that would end after this long
    # Over the last part of the run (by time budget or epochs, whichever comes first) the learning
    # rate falls linearly to 2 % of what the plateau schedule set: a run cut short by its budget
    # otherwise ends at a high learning rate, mid-plateau.
    anneal_fraction: float = 0.35
    loss_beta: float = 0.5               # `focus_loss`
    # The model judged, kept and exported is an exponential moving average of the trained weights (and of the batch
    # norms' statistics) with this decay per step; 0 keeps the trained weights themselves.
    weight_average_decay: float = 0.998
    threads: int = 2
    seed: int = 0
    patch_px: int = 96
    # All 16 of a 384 px evaluation tile: chosen on the validation specimens
    # (`wsi-autofocus eval --split val --patches-per-tile N`), never on the test specimens.
    patches_per_tile: int = 16


def seed_everything(seed: int) -> None:
    """Seeds every generator the training draws from. Bitwise-deterministic kernels are not forced:
    on the CPU they triple the cost of a training step (measured). Two runs therefore differ; the
    model card reports another run of the recipe beside the shipped one (`model_card.record_reproduction`)."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate_loss(model: nn.Module, loader: DataLoader, loss_beta: float) -> tuple[float, float]:
    """(mean loss, MAE µm) over a loader."""
    model.eval()
    losses, errors = [], []
    with torch.inference_mode():
        for patches, context, optics, target in loader:
            output = model.forward_with_near_head(patches, context, optics)
            losses.append(training_loss(output, target, loss_beta).item() * len(target))
            errors.append((signed_defocus(output) - target).abs())
    count = sum(len(e) for e in errors)
    return sum(losses) / count, torch.cat(errors).mean().item()


def fit_uncertainty_calibration(output: torch.Tensor, target: torch.Tensor) -> dict:
    """Temperature scaling of model outputs (distance, log variance, logit) against signed labels:
    `uncertainty_scale`, the factor s that makes the distance error / (s * sigma) unit-variance (the
    maximum-likelihood scale of a Gaussian), and `side_temperature`, the divisor of the above-focus
    logit that minimises the cross-entropy beyond SIDE_WEIGHT_DISTANCE_UM."""
    squared = (output[:, 0] - target.abs()) ** 2 / output[:, 1].exp()
    sided = target.abs() > SIDE_WEIGHT_DISTANCE_UM
    logits, above = output[sided, 2], (target[sided] > 0).float()
    temperatures = np.exp(np.linspace(np.log(0.25), np.log(20.0), 121))
    losses = [nn.functional.binary_cross_entropy_with_logits(logits / float(t), above).item() for t in temperatures]
    return {"uncertainty_scale": float(squared.mean().sqrt()),
            "side_temperature": float(temperatures[int(np.argmin(losses))])}


def uncertainty_calibration(model: nn.Module, loader: DataLoader) -> dict:
    """`fit_uncertainty_calibration` on data the training never saw (validation specimens, textures and
    sampled microscopes): training data makes the network over-confident."""
    model.eval()
    outputs, targets = [], []
    with torch.inference_mode():
        for patches, context, optics, target in loader:
            outputs.append(model(patches, context, optics))
            targets.append(target)
    return fit_uncertainty_calibration(torch.cat(outputs), torch.cat(targets))


def anneal_factor(progress: float, anneal_fraction: float, floor: float = 0.02) -> float:
    """Learning-rate multiplier at `progress` (0 = start, 1 = end of the run)."""
    if anneal_fraction <= 0 or progress <= 1.0 - anneal_fraction:
        return 1.0
    return max(floor, (1.0 - progress) / anneal_fraction)


def save_checkpoint(model: FocusRegressor, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"architecture": model.arch.to_dict(), "patch_px": model.patch_px,
                "defocus_scale_um": model.defocus_scale_um,
                "state_dict": model.state_dict(), "metadata": metadata}, path)


class IncompatibleModelError(ValueError):
    """A checkpoint written by a version whose model answers other outputs."""


def load_checkpoint(path: Path) -> FocusRegressor:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    version = str(checkpoint.get("metadata", {}).get("version", "0"))
    if not version.isdigit() or int(version) < int(MODEL_VERSION):
        raise IncompatibleModelError(f"{path} is focus model version {version}; this version reads version "
                                     f"{MODEL_VERSION} models (optics {', '.join(OPTICS_FEATURES)}; outputs "
                                     f"{', '.join(MODEL_OUTPUTS)}): train a new one (make train-autofocus), or "
                                     "calibrate again from the shipped model")
    arch = checkpoint["architecture"]
    model = FocusRegressor(Architecture(arch["name"], tuple(arch["blocks_per_stage"]), tuple(arch["widths"]),
                                        arch["stem_width"]), checkpoint["patch_px"], checkpoint["defocus_scale_um"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def train(train_data: dict, val_data: dict, config: TrainingConfig, output_dir: Path, log=print) -> dict:
    """Train, keep the best checkpoint by validation loss, export it; return the training history."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    # NHWC convolutions are ~1.6x faster than NCHW in oneDNN on a CPU (measured, forward + backward).
    model = build_model(config.architecture, config.patch_px).to(memory_format=torch.channels_last)
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.weight_average_decay), use_buffers=True)
                if config.weight_average_decay else None)
    judged = averaged.module if averaged else model
    train_set = InlineFocusDataset(train_data["fields"], optics_columns(train_data), train_data["defocus_um"],
                                   config.patch_px, augment=True, seed=config.seed)
    val_set = InlineFocusDataset(val_data["fields"], optics_columns(val_data), val_data["defocus_um"],
                                 config.patch_px, augment=False)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=None, sampler=BatchSampler(
        RandomSampler(train_set, generator=generator), config.batch_size, drop_last=False))
    val_loader = DataLoader(val_set, batch_size=None, sampler=BatchSampler(SequentialSampler(val_set), 256, False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=config.lr_patience)
    output_dir.mkdir(parents=True, exist_ok=True)
    best_loss, epochs_without_gain, history = float("inf"), 0, []
    started = time.monotonic()
    metadata = {"name": MODEL_NAME, "version": MODEL_VERSION, "architecture": config.architecture,
                "patch_px": config.patch_px, "patches_per_tile": config.patches_per_tile,
                "training": asdict(config)}
    steps_per_epoch = len(train_loader)
    plateau_lrs = [group["lr"] for group in optimizer.param_groups]
    epoch_s = 0.0
    for epoch in range(config.epochs):
        epoch_started = time.monotonic()
        if epoch > 0 and epoch_started - started + epoch_s > config.time_budget_s:
            log(f"time budget of {config.time_budget_s:.0f} s reached")
            break
        model.train()
        for step, (patches, context, optics, target) in enumerate(train_loader):
            progress = max((epoch + step / steps_per_epoch) / config.epochs,
                           (time.monotonic() - started) / config.time_budget_s)
            factor = anneal_factor(progress, config.anneal_fraction)
            for group, plateau_lr in zip(optimizer.param_groups, plateau_lrs):
                group["lr"] = plateau_lr * factor
            optimizer.zero_grad()
            # The context stays NCHW: it only feeds the spectrum's matrix products over rows and columns.
            output = model.forward_with_near_head(patches.contiguous(memory_format=torch.channels_last), context, optics)
            loss = training_loss(output, target, config.loss_beta)
            loss.backward()
            optimizer.step()
            if averaged:
                averaged.update_parameters(model)
        epoch_s = time.monotonic() - epoch_started
        val_loss, val_mae = evaluate_loss(judged, val_loader, config.loss_beta)
        # The plateau schedule sees and changes its own learning rate, not the annealed one.
        for group, plateau_lr in zip(optimizer.param_groups, plateau_lrs):
            group["lr"] = plateau_lr
        scheduler.step(val_loss)
        plateau_lrs = [group["lr"] for group in optimizer.param_groups]
        lr = plateau_lrs[0] * factor
        history.append({"epoch": epoch, "val_loss": val_loss, "val_mae_um": val_mae, "lr": lr,
                        "elapsed_s": time.monotonic() - started})
        log(f"epoch {epoch:3d}  val loss {val_loss:7.4f}  val MAE {val_mae:6.3f} µm  lr {lr:.2e}  "
            f"{time.monotonic() - started:6.0f} s")
        if val_loss < best_loss - 1e-4:
            best_loss, epochs_without_gain = val_loss, 0
            save_checkpoint(judged, output_dir / "model.pt", metadata | {"epoch": epoch, "val_mae_um": val_mae})
        else:
            epochs_without_gain += 1
        if epochs_without_gain >= config.early_stopping_patience:
            log(f"early stop: no validation gain for {epochs_without_gain} epochs")
            break
    best = load_checkpoint(output_dir / "model.pt")
    export(best, output_dir, config.patch_px)
    calibration = uncertainty_calibration(best, val_loader)
    log(f"uncertainty scale {calibration['uncertainty_scale']:.3f}, side temperature "
        f"{calibration['side_temperature']:.2f} on the validation set")
    (output_dir / "metadata.json").write_text(json.dumps(
        metadata | {"history": history, "best_val_loss": best_loss} | calibration, indent=1))
    return {"history": history, "best_val_loss": best_loss} | calibration


def model_example_inputs(patch_px: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """One sample of each model input (MODEL_INPUTS), for tracing and TensorRT conversion."""
    return (torch.rand(1, 3, patch_px, patch_px, device=device), torch.rand(1, 3, patch_px, patch_px, device=device),
            torch.tensor([[0.75, 0.325, 0.7, 0.0]], device=device))


def export(model: FocusRegressor, output_dir: Path, patch_px: int) -> None:
    """ONNX (dynamic batch, opset 17) and TorchScript next to the checkpoint."""
    model = model.eval()
    example = model_example_inputs(patch_px)
    torch.onnx.export(model, example, output_dir / "model.onnx", input_names=list(MODEL_INPUTS),
                      output_names=["estimate"],
                      dynamic_axes={name: {0: "batch"} for name in (*MODEL_INPUTS, "estimate")},
                      opset_version=17, dynamo=False)
    torch.jit.trace(model, example).save(str(output_dir / "model.torchscript.pt"))
