"""One training step, and what it is made of: the optimizer, the learning-rate schedule and the loss."""
import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from core import distributed
from core.errors import ConfigError

STEP_OK, STEP_NONFINITE, STEP_AMP_OVERFLOW = "ok", "nonfinite", "amp_overflow"


def train_step(model, batch, loss_fn, optimizer, scaler, t, device, use_amp):
    """One optimizer step; returns (detached loss, outcome). The outcome is STEP_OK; STEP_NONFINITE when the
    loss or the gradients are not finite on any rank (nothing changes: no update, BatchNorm statistics put
    back); or STEP_AMP_OVERFLOW when AMP's scaler skipped a float16 overflow and lowered its scale."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    buffers = [b.detach().clone() for b in model.buffers()]  # a NaN forward would poison running statistics
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        outputs = model(image)
    # The loss in float32: DiceCE sums over all voxels of the crops, which can overflow float16.
    outputs = [o.float() for o in outputs] if isinstance(outputs, (list, tuple)) else outputs.float()
    loss = loss_fn(outputs, label)
    # Backward even for a bad loss: under DDP every rank must join the gradient all-reduce.
    scaler.scale(loss).backward()
    loss_finite = distributed.all_reduce_max((~torch.isfinite(loss.detach())).int()).item() == 0
    scaler.unscale_(optimizer)  # a no-op without AMP
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    grads_finite = bool(torch.isfinite(norm))
    if loss_finite and grads_finite and t["grad_clip"] is not None:
        torch.nn.utils.clip_grads_with_norm_(params, t["grad_clip"], norm)
    if loss_finite and (grads_finite or use_amp):
        scale = scaler.get_scale() if use_amp else 1.0
        scaler.step(optimizer)  # the scaler skips the update when it found inf/NaN gradients
        scaler.update()
        if grads_finite:
            return loss.detach(), STEP_OK
        if scale >= 1.0:  # below a scale of 1, float16 overflow no longer explains it
            return loss.detach(), STEP_AMP_OVERFLOW
    elif use_amp:
        scaler.update()  # closes this step's unscale_; the scale is lowered, as for an overflow
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return loss.detach(), STEP_NONFINITE


def make_optimizer(model, t):
    """SGD or AdamW as the trainer section `t` says."""
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], nesterov=t["nesterov"],
                               weight_decay=t["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])


def lr_factor(iteration, warmup, total):
    """Multiplier of the base learning rate for optimizer step `iteration` (0-based): linear warmup over
    `warmup` steps reaching 1 at the last one, then half a cosine period down to 0 at `total`."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    progress = min((iteration - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, t):
    # A closure rather than monai's WarmupCosineSchedule: that one stores t_total in its state_dict,
    # so a resume with a raised max_epochs would keep following the old, shorter schedule.
    warmup = t["warmup_epochs"] * t["iters_per_epoch"]
    total = t["max_epochs"] * t["iters_per_epoch"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, warmup, total))


def rebase_schedule(scheduler, optimizer, lr):
    """After loading a saved scheduler: follow this config's schedule and base rate from the saved step on."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # the lambda of this config, not the saved one
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = lr, lr * factor


def make_loss(deep_supervision_weights):
    # No numerator smoothing, as in the reference: a class absent from a crop then adds a constant to
    # the Dice loss instead of pushing its prediction to zero everywhere (which stalls small organs).
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    return DeepSupervisionLoss(dice_ce, deep_supervision_weights)


class DeepSupervisionLoss(torch.nn.Module):
    """Weighted sum of `loss` over the model's outputs [main, aux1, aux2, ...], weights normalised to 1.

    Auxiliary logits are upsampled trilinearly to the label size, as the reference does (monai's
    DeepSupervisionLoss instead downsamples the labels). A single tensor output gets `loss` alone.
    """

    def __init__(self, loss, weights):
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs, label):
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        if len(outputs) > len(self.weights):
            raise ConfigError(f"the model returned {len(outputs)} outputs but trainer.deep_supervision_weights "
                              f"has only {len(self.weights)} weights")
        weights = self.weights[:len(outputs)]
        total = 0.0
        for w, out in zip(weights, outputs):
            if out.shape[2:] != label.shape[2:]:
                out = F.interpolate(out, size=label.shape[2:], mode="trilinear", align_corners=False)
            total = total + w * self.loss(out, label)
        return total / sum(weights)
