"""Training: SGD on the sum of per-exit cross-entropies (paper §4, "loss functions").

Options from IMTA (Li et al., "Improved Techniques for Training Adaptive Deep
Networks", ICCV 2019): gradient equilibrium (each exit's loss reaches a shared
feature map with its gradient averaged, not summed) and distillation of the last
exit's soft predictions into the earlier ones.

A training state file (``OUT.state``) is written after every epoch; ``--resume``
continues from it. The best epoch by last-exit accuracy on the validation split
(never the test split) is kept.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import checkpoint as ckpt
from . import data as D
from .config import MSDNetConfig
from .network import MSDNet


@dataclass
class TrainOptions:
    """What ``msdnet train`` takes; see its ``--help`` for each flag."""

    config: MSDNetConfig
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_size: int = 5000
    seed: int = 0
    pad: int = 2
    gradient_equilibrium: bool = False
    distill: float = 0.0
    distill_temperature: float = 4.0
    device: str = "cpu"
    threads: int | None = None
    limit_train: int | None = None
    out: str = "model/weights/fashion-mnist.pt"
    resume: bool = False


class _GradientScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def forward_train(model: MSDNet, x: Tensor, gradient_equilibrium: bool) -> list[Tensor]:
    """All-exit forward for training. With gradient equilibrium (IMTA §3.1) the
    coarsest map after block i (read by K - i losses, i 0-based) passes
    1 / (K - i) of the gradient from its classifier and (K - i - 1) / (K - i)
    from the later blocks, so no shared layer sees a sum of K gradients."""
    if not gradient_equilibrium:
        return model(x)
    k_all = model.num_exits
    feats = model.stem(x)
    top = model.cfg.n_scales - 1
    out = []
    for i, (block, head) in enumerate(zip(model.blocks, model.classifiers)):
        for layer in block:
            feats = {s: layer.forward_scale(s, feats) for s in layer.scales}
        losses_below = k_all - i
        out.append(head(_GradientScale.apply(feats[top], 1.0 / losses_below)))
        if i + 1 < k_all:
            feats = {s: _GradientScale.apply(f, (losses_below - 1) / losses_below) for s, f in feats.items()}
    return out


def exit_loss(logits: list[Tensor], y: Tensor, distill: float, temperature: float) -> tuple[Tensor, list[Tensor]]:
    """Sum over exits of cross-entropy; with ``distill`` = a in (0, 1], exits
    1..K-1 use (1 - a) CE + a T^2 KL(last exit's soft labels || exit's) at
    temperature T. Returns (total, per-exit losses)."""
    per_exit = []
    soft = F.softmax(logits[-1].detach() / temperature, dim=1) if distill > 0 else None
    for k, z in enumerate(logits):
        ce = F.cross_entropy(z, y)
        if soft is not None and k + 1 < len(logits):
            kl = F.kl_div(F.log_softmax(z / temperature, dim=1), soft, reduction="batchmean")
            ce = (1 - distill) * ce + distill * temperature ** 2 * kl
        per_exit.append(ce)
    return torch.stack(per_exit).sum(), per_exit


@torch.no_grad()
def exit_accuracy(model: MSDNet, data: D.ImageSet, mean, std, batch_size: int = 500,
                  device: str = "cpu") -> list[float]:
    """Top-1 accuracy of every exit (fractions in [0, 1]), test-time transforms."""
    model.eval()
    correct = torch.zeros(model.num_exits)
    for x, y in D.batches(data, batch_size, mean, std):
        for k, z in enumerate(model(x.to(device).contiguous(memory_format=torch.channels_last))):
            correct[k] += (z.argmax(1).cpu() == y).sum()
    return (correct / len(data)).tolist()


def _lr_at(opts: TrainOptions, epoch: float) -> float:
    if opts.schedule == "cosine":
        return 0.5 * opts.lr * (1 + math.cos(math.pi * epoch / opts.epochs))
    # Step: divide by 10 at 50% and 75% of training (the official CIFAR recipe).
    return opts.lr * (0.1 ** (int(epoch >= 0.5 * opts.epochs) + int(epoch >= 0.75 * opts.epochs)))


def train(opts: TrainOptions, command: str | None = None) -> ckpt.Checkpoint:
    """Train, keep the best epoch by validation last-exit accuracy, and write
    ``opts.out`` (uncalibrated: run ``msdnet calibrate`` next).

    Raises:
        DataError: when the data set is missing.
    """
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    cfg = opts.config
    full = D.load(opts.data, "train", opts.data_dir, cfg.image_size, cfg.in_channels)
    if tuple(full.images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise D.DataError(f"data images are {tuple(full.images.shape[1:])} but the config expects "
                          f"({cfg.in_channels}, {cfg.image_size}, {cfg.image_size})")
    if len(full.classes) != cfg.num_classes:
        raise D.DataError(f"data has {len(full.classes)} classes but the config expects {cfg.num_classes}")
    train_idx, val_idx = D.validation_split(len(full), opts.val_size, opts.seed)
    if opts.limit_train:
        train_idx = train_idx[:opts.limit_train]
    train_set, val_set = full.subset(train_idx), full.subset(val_idx)
    mean, std = D.normalisation(opts.data, train_set)

    model = MSDNet(cfg).to(opts.device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                                nesterov=True, weight_decay=opts.weight_decay)
    generator = torch.Generator().manual_seed(opts.seed + 1)
    state_path = Path(str(opts.out) + ".state")
    start_epoch, best, history, wall = 0, (-1.0, None), [], 0.0
    if opts.resume and state_path.exists():
        st = torch.load(state_path, map_location=opts.device, weights_only=True)
        model.load_state_dict(st["model"])
        optimiser.load_state_dict(st["optimiser"])
        generator.set_state(st["generator"])
        start_epoch, history, wall = st["epoch"], st["history"], st["wall_time_s"]
        best = (st["best_acc"], st["best_model"])
        print(f"resumed from {state_path} after epoch {start_epoch}", file=sys.stderr)

    steps_per_epoch = math.ceil(len(train_set) / opts.batch_size)
    for epoch in range(start_epoch, opts.epochs):
        t0 = time.time()
        model.train()
        running = torch.zeros(cfg.n_blocks)
        correct = torch.zeros(cfg.n_blocks)
        seen = 0
        bar = tqdm(D.batches(train_set, opts.batch_size, mean, std, shuffle=True, generator=generator, pad=opts.pad),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{opts.epochs}", file=sys.stderr,
                   mininterval=5.0)
        for i, (x, y) in enumerate(bar):
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(opts, epoch + i / steps_per_epoch)
            x = x.to(opts.device).contiguous(memory_format=torch.channels_last)
            y = y.to(opts.device)
            logits = forward_train(model, x, opts.gradient_equilibrium)
            loss, per_exit = exit_loss(logits, y, opts.distill, opts.distill_temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            n = len(y)
            seen += n
            running += torch.stack([p.detach().cpu() for p in per_exit]) * n
            correct += torch.stack([(z.argmax(1) == y).sum().cpu() for z in logits])
            bar.set_postfix(refresh=False, loss=" ".join(f"{v:.2f}" for v in (running / seen).tolist()),
                            acc=" ".join(f"{v:.3f}" for v in (correct / seen).tolist()))
        bar.close()
        val_acc = exit_accuracy(model, val_set, mean, std, device=opts.device)
        wall += time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": (running / seen).tolist(),
                        "train_top1": (correct / seen).tolist(), "val_top1": val_acc,
                        "seconds": time.time() - t0})
        print(f"epoch {epoch + 1}: val top-1 per exit {[round(a, 4) for a in val_acc]} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        if val_acc[-1] > best[0]:
            best = (val_acc[-1], {k: v.detach().clone() for k, v in model.state_dict().items()})
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "generator": generator.get_state(), "epoch": epoch + 1, "history": history,
                    "wall_time_s": wall, "best_acc": best[0], "best_model": best[1]}, state_path)

    model.load_state_dict(best[1])
    model = model.cpu().to(memory_format=torch.contiguous_format)
    epochs = tuple(ckpt.EpochRecord.from_dict(h) for h in history)  # the state file keeps the card's format
    training = ckpt.TrainingRecord(command or "", round(wall, 1), opts.epochs, opts.batch_size, opts.lr,
                                   opts.schedule, opts.seed, opts.gradient_equilibrium, opts.distill,
                                   torch.get_num_threads(), epochs)
    card = ckpt.ModelCard(training=training, val_top1=max((e.val_top1 for e in epochs), key=lambda a: a[-1]))
    out = ckpt.build(model, full.classes, mean, std, card=card,
                     validation=ckpt.ValidationSplit(opts.data, opts.seed, opts.val_size))
    out.save(opts.out)
    return out


def shell_command(argv: list[str]) -> str:
    """The command line as typed, for the model card."""
    return "msdnet " + " ".join(shlex.quote(a) for a in argv)
