"""``msdnet`` sub-commands for the model: info, train, calibrate, evaluate, import-official.

The console script itself lives in :mod:`server.cli`, which adds ``serve``;
``python -m model.cli`` runs these without the server installed.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import checkpoint as ckpt
from .config import PRESETS, MSDNetConfig, preset
from .data import DATASETS, DataError
from .official import OfficialImportError


def _config_from(args) -> MSDNetConfig:
    if getattr(args, "checkpoint", None):
        return ckpt.load(args.checkpoint).config
    if args.config:
        return MSDNetConfig.from_json(args.config)
    return preset(args.preset or "fashion-mnist")


def _add_config_source(p: argparse.ArgumentParser, with_checkpoint: bool) -> None:
    g = p.add_mutually_exclusive_group(required=with_checkpoint)
    g.add_argument("--preset", choices=list(PRESETS), help="a named configuration")
    g.add_argument("--config", metavar="FILE", help="a JSON file of MSDNetConfig fields")
    if with_checkpoint:
        g.add_argument("--checkpoint", metavar="FILE", help="read the config from a checkpoint")


def _calibration_summary(ck) -> dict | None:
    """What ``msdnet info`` says of a checkpoint's calibration; None when uncalibrated."""
    cal = ck.calibration
    if cal is None:
        return None
    images = (f"{cal.images_count} images from {cal.images_source}" if cal.images_count
              else "on its validation split")
    return {"images": images, "target_flops": cal.target_flops, "val_top1": cal.val_top1,
            "temperatures": list(cal.temperatures), "thresholds": list(cal.thresholds), "curve_points": len(cal.curve)}


def cmd_info(args) -> int:
    from .costs import exit_costs
    from .network import MSDNet

    cfg = _config_from(args)
    costs = exit_costs(MSDNet(cfg))
    rows = [{"exit": c.exit, "flops": c.flops, "flops_lazy": c.flops_lazy,
             "flops_official": c.flops_official, "params": c.params} for c in costs]
    loaded = ckpt.load(args.checkpoint) if getattr(args, "checkpoint", None) else None
    contract = loaded.transforms if loaded is not None else None
    if args.json:
        out = {"unit": "multiply-accumulates of convs and linears, cumulative, batch 1", "exits": rows}
        if loaded is not None:
            out["transforms"] = contract.to_transforms()
            out["classes"] = loaded.classes
            out["calibration"] = _calibration_summary(loaded)
        print(json.dumps(out, indent=2))
        return 0
    if contract is not None:
        print(f"Input: {contract.describe()}")
        cal = _calibration_summary(loaded)
        if cal is None:
            print("Calibration: none (msdnet serve refuses it; run msdnet calibrate first)")
        else:
            print(f"Calibration: {cal['images']}; default target {cal['target_flops'] / 1e6:.3f} MFLOPs per image "
                  f"(lazy), validation top-1 {cal['val_top1']}, {cal['curve_points']} curve points; temperatures "
                  f"{', '.join(f'{t:.3f}' for t in cal['temperatures'])}; thresholds "
                  f"{', '.join(f'{t:.4f}' for t in cal['thresholds'])}")
    print("Per-exit cumulative cost at batch size 1. FLOPs = multiply-accumulates of convs and linears")
    print("(MSDNet paper); 'lazy' defers finer-scale work that only later exits need (paper §4);")
    print("'official' adds ReLU/pooling/bias ops as the official MSDNet counter does.")
    print(f"{'exit':>4} {'MFLOPs':>10} {'MFLOPs lazy':>12} {'MFLOPs official':>16} {'params (M)':>11}")
    for r in rows:
        print(f"{r['exit']:>4} {r['flops'] / 1e6:>10.2f} {r['flops_lazy'] / 1e6:>12.2f} "
              f"{r['flops_official'] / 1e6:>16.2f} {r['params'] / 1e6:>11.3f}")
    return 0


def cmd_train(args) -> int:
    from .train import TrainOptions, shell_command, train

    opts = TrainOptions(
        config=_config_from(args), data=args.data, data_dir=args.data_dir, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, weight_decay=args.weight_decay,
        val_size=args.val_size, seed=args.seed, pad=args.pad, gradient_equilibrium=args.gradient_equilibrium,
        distill=args.distill, distill_temperature=args.distill_temperature, device=args.device,
        threads=args.threads, limit_train=args.limit_train, out=args.out, resume=args.resume)
    result = train(opts, command=shell_command(sys.argv[1:]))
    print(f"wrote {args.out} (validation top-1 per exit: {list(result.card.val_top1)}); "
          f"next: msdnet calibrate --checkpoint {args.out}")
    return 0


def cmd_calibrate(args) -> int:
    from .evaluate import add_figures, calibrate

    ck = ckpt.load(args.checkpoint)
    if args.figures_only:
        cal = add_figures(ck, args.data_dir, data=args.data, split=args.split)
        ck.save(args.out or args.checkpoint)
        point = next((p for p in cal.curve if p.thresholds == cal.thresholds), None)
        if point is not None and point.exit_agreement is not None:
            shown = ", ".join("-" if a is None else f"{100 * a:.2f}%" for a in point.exit_agreement)
            print(f"agreement with the last exit per exit at the default thresholds: {shown}")
        print(f"added per-exit figures to {len(cal.curve)} curve points; wrote {args.out or args.checkpoint}")
        return 0
    cal = calibrate(ck, args.data_dir, target_flops=args.target_flops, max_drop=args.max_drop / 100,
                    data=args.data, split=args.split)
    ck.save(args.out or args.checkpoint)
    temps = ", ".join(f"{t:.3f}" for t in cal.temperatures)
    ths = ", ".join(f"{t:.4f}" for t in cal.thresholds)
    print(f"temperatures: {temps}\nthresholds: {ths}\n"
          f"validation: mean {cal.target_flops / 1e6:.2f} MFLOPs per image (multiply-accumulates, lazy), "
          f"top-1 {100 * cal.val_top1:.2f}% ({cal.rule}); {len(cal.curve)} curve points")
    for warning in _calibration_warnings(cal):
        print(f"msdnet calibrate: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out or args.checkpoint}")
    return 0


def _calibration_warnings(cal) -> list[str]:
    """What in a fresh calibration a person should look at twice."""
    from .calibration import NEVER

    out = []
    bounds = [k for k, t in enumerate(cal.temperatures, start=1) if t <= 0.05 or t >= 20.0]
    if bounds:
        out.append(f"the temperature of exit(s) {bounds} hit the fitting bound (0.05 or 20): their logits say "
                   "little about these images (an untrained network, or too few or unlike images)")
    if cal.images_count is not None and cal.images_count < 200:
        out.append(f"calibrated on {cal.images_count} images: thresholds and the curve from so few are noisy "
                   "(a few thousand held-out images are usual)")
    never = [k for k, t in enumerate(cal.thresholds[:-1], start=1) if t == NEVER]
    if never:
        out.append(f"at the default target no image leaves at exit(s) {never} (threshold inf)")
    if len(cal.curve) < 3:
        out.append(f"the budgeted-batch curve has {len(cal.curve)} point(s): budgets and targets can only "
                   "choose between those")
    return out


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, plot

    ck = ckpt.load(args.checkpoint)
    result = evaluate(ck, args.data_dir, latency_repeats=args.latency_repeats, data=args.data, split=args.split)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    print("Anytime (test split). MFLOPs = cumulative multiply-accumulates of convs and linears per image;")
    print("'lazy' = with lazy evaluation (what the server spends). Latency: CPU, staged forward, median.")
    print(f"{'exit':>4} {'top-1 %':>8} {'MFLOPs':>8} {'lazy':>8} {'params M':>9} {'ms b=1':>8} {'ms b=64':>8}")
    for r in result["anytime"]:
        print(f"{r['exit']:>4} {100 * r['top1']:>8.2f} {r['flops'] / 1e6:>8.2f} {r['flops_lazy'] / 1e6:>8.2f} "
              f"{r['params'] / 1e6:>9.3f} {r['latency_ms_b1']:>8.2f} {r['latency_ms_b64']:>8.2f}")
    d = result["default"]
    print(f"default thresholds: test top-1 {100 * d['top1']:.2f}% at {d['mean_flops'] / 1e6:.2f} MFLOPs per image "
          f"(exit shares {', '.join(f'{s:.3f}' for s in d['exit_shares'])})")
    print("budgeted batch (thresholds from validation; test):")
    for r in result["budgeted"][:: max(1, len(result["budgeted"]) // 12)]:
        print(f"  {r['mean_flops'] / 1e6:6.2f} MFLOPs  top-1 {100 * r['top1']:.2f}%")
    return 0


def _contract_from(args):
    """The input contract of import-official: the official loader's for --data,
    with any option given on the command line replacing its field."""
    import dataclasses

    from .official import OFFICIAL_TRANSFORMS, parse_official_args

    base = OFFICIAL_TRANSFORMS[parse_official_args(args.official_args).data]
    changes = {"resize_rule": args.resize_rule, "resize_size": args.resize_size,
               "interpolation": args.interpolation, "background": args.background,
               "mean": tuple(args.mean) if args.mean else None, "std": tuple(args.std) if args.std else None}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.crop_size is not None:
        changes["crop_size"] = args.crop_size or None
    return dataclasses.replace(base, **changes).validate()


def cmd_import_official(args) -> int:
    from pathlib import Path

    from .official import import_official
    from .train import shell_command

    classes = None
    if args.classes:
        classes = [ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()]
    ck = import_official(args.checkpoint, args.official_args, classes=classes, contract=_contract_from(args),
                         command=shell_command(sys.argv[1:]))
    ck.save(args.out)
    lazy = ", ".join(f"{c.flops_lazy / 1e6:.3f}" for c in ck.costs)
    eager = ", ".join(f"{c.flops / 1e6:.3f}" for c in ck.costs)
    print(f"imported {args.checkpoint}: {ck.config.n_blocks} exits, {ck.config.num_classes} classes; "
          f"MFLOPs per exit (conv + linear multiply-accumulates, cumulative): {lazy} with lazy evaluation "
          f"(what the server spends and reports), {eager} computing every scale of each block "
          "(without lazy evaluation)")
    print(f"input: {ck.transforms.describe()}")
    print(f"wrote {args.out}; next: msdnet calibrate --checkpoint {args.out} --data folder --data-dir DIR")
    return 0


def add_commands(sub) -> None:
    """Register the model sub-commands on an ``argparse`` sub-parser set."""
    p = sub.add_parser("info", help="per-exit cumulative FLOPs and parameters")
    _add_config_source(p, with_checkpoint=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("import-official", help="convert a checkpoint of the official MSDNet-PyTorch code")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="main.py's checkpoint dict or a bare state_dict")
    p.add_argument("--official-args", required=True, metavar="ARGS",
                   help='the official training arguments, e.g. "--data cifar10 --nBlocks 7 --stepmode even '
                        '--step 2 --base 4 --nChannels 16"')
    p.add_argument("--out", required=True, metavar="OUT.pt", help="checkpoint of this project to write")
    p.add_argument("--classes", metavar="FILE", help="class names, one per line (default: CIFAR names; "
                   "class_0000.. for ImageNet)")
    p.add_argument("--resize-rule", choices=["exact", "shorter"], help="default: the official loader's")
    p.add_argument("--resize-size", type=int, help="pixels (default: 32 CIFAR, 256 ImageNet)")
    p.add_argument("--crop-size", type=int, help="center crop in pixels, 0 for none (default: none CIFAR, "
                   "224 ImageNet)")
    p.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos"])
    p.add_argument("--mean", type=float, nargs=3, help="per channel, pixel values in [0, 1]")
    p.add_argument("--std", type=float, nargs=3)
    p.add_argument("--background", type=int, help="grey level 0-255 for transparent pixels (default 0)")
    p.set_defaults(func=cmd_import_official)

    p = sub.add_parser("train", help="train an MSDNet (sum of per-exit cross-entropies)")
    _add_config_source(p, with_checkpoint=False)
    p.add_argument("--data", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", help="folder of the data files (default for fashion-mnist: "
                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-size", type=int, default=5000, help="held-out validation images from the training set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pad", type=int, default=2, help="random-crop padding in pixels (0: no augmentation)")
    p.add_argument("--gradient-equilibrium", action="store_true", help="IMTA gradient equilibrium")
    p.add_argument("--distill", type=float, default=0.0, help="IMTA distillation weight in [0, 1]")
    p.add_argument("--distill-temperature", type=float, default=4.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--limit-train", type=int, help="use only this many training images (smoke tests)")
    p.add_argument("--out", default=str(ckpt.DEFAULT_CHECKPOINT), help="checkpoint to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="per-exit temperatures and budgeted-batch thresholds (validation split)")
    p.add_argument("--checkpoint", default=str(ckpt.DEFAULT_CHECKPOINT))
    p.add_argument("--data", choices=DATASETS, help="default: the checkpoint's data set; 'folder': your images "
                   "in DATA_DIR/SPLIT/<class>/*.jpg|png, through the checkpoint's preprocessing")
    p.add_argument("--split", default="val", help="folder split to calibrate on (default val)")
    p.add_argument("--data-dir")
    p.add_argument("--target-flops", type=float, help="mean FLOPs per image the default thresholds may spend "
                   "(multiply-accumulates); default: cheapest point within --max-drop of the last exit")
    p.add_argument("--max-drop", type=float, default=0.2, help="accuracy points the default may lose (0.2); "
                   "not used with --target-flops")
    p.add_argument("--out", help="write here instead of updating the checkpoint in place")
    p.add_argument("--figures-only", action="store_true", help="keep the temperatures, thresholds and curve; add "
                   "the per-exit agreement with the last exit, top-1 and mean confidence the server's accuracy "
                   "watch compares with (a checkpoint calibrated before they existed)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="anytime table and budgeted-batch curve on the test split")
    p.add_argument("--checkpoint", default=str(ckpt.DEFAULT_CHECKPOINT))
    p.add_argument("--data", choices=DATASETS, help="default: the checkpoint's data set; 'folder': your "
                   "images in DATA_DIR/SPLIT/<class>/*")
    p.add_argument("--split", default="test", help="folder split to evaluate on (default test)")
    p.add_argument("--data-dir")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot accuracy against FLOPs")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.set_defaults(func=cmd_evaluate)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and dispatch; known errors print one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ckpt.CheckpointError, DataError, OfficialImportError, ValueError, KeyError,
            FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"msdnet {args.command}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msdnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
