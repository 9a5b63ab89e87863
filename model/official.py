"""Import checkpoints of the official MSDNet code (kalviny/MSDNet-PyTorch).

Facts taken from the official code (commit f654595), rewritten here:

- Its command line (``args.py``, post-processed by ``main.py``) fixes the
  architecture: ``--data cifar10|cifar100|ImageNet`` (stem, head width, number of
  classes), ``--nBlocks --base --step --stepmode --nChannels --growthRate
  --grFactor 1-2-4 --bnFactor 1-2-4 --prune --reduction --bottleneck``.
- ``main.py`` saves ``{"epoch", "arch", "state_dict", "best_prec1", "optimizer"}``
  with the model wrapped in ``DataParallel``, so every weight key starts with
  ``module.``; people also save a bare ``model.state_dict()``.
- Its module names (``blocks.<b>.<entry>``, ``classifier.<b>``) differ from this
  project's; :func:`official_key_map` translates them (see its docstring).

Loading runs no pickled code: ``torch.load(..., weights_only=True)``; a file that
needs more (an ``argparse.Namespace``, a dataclass, any class) is refused.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shlex
from pathlib import Path

import torch

from .config import MSDNetConfig
from .network import MSDNet
from .transforms import InputContract

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard "
    "lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark "
    "shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone "
    "television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()

# The official data loader's test-time transforms (dataloader.py). CIFAR images
# are 32x32 there and get no resize; served pictures of other sizes are resized
# to 32x32 (bilinear, our choice). ImageNet: Resize(256) (bilinear), CenterCrop(224).
OFFICIAL_TRANSFORMS = {
    "cifar10": InputContract(3, "exact", 32, "bilinear", None, (0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": InputContract(3, "exact", 32, "bilinear", None, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "ImageNet": InputContract(3, "shorter", 256, "bilinear", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Official options that do not change the network: accepted and ignored, so a
# training command line can be pasted as it is.
_IGNORED = {"--save": 1, "--resume": 0, "--evalmode": 1, "--evaluate-from": 1, "--print-freq": 1, "-p": 1,
            "--seed": 1, "--gpu": 1, "--data-root": 1, "--use-valid": 0, "-j": 1, "--workers": 1,
            "--epochs": 1, "--start-epoch": 1, "-b": 1, "--batch-size": 1, "--optimizer": 1, "--lr": 1,
            "--learning-rate": 1, "--lr-type": 1, "--decay-rate": 1, "--momentum": 1, "--weight-decay": 1,
            "--wd": 1,
            # the official args.py's other options: evaluation, its DenseNet/ResNet architectures, optimisers
            "--eval": 1, "--evaluate": 1, "-d": 1, "--depth": 1, "--drop-rate": 1, "--death-mode": 1,
            "--death-rate": 1, "--growth-rate": 1, "--bn-size": 1, "--trainer": 1, "--patience": 1, "--alpha": 1,
            "--beta1": 1, "--beta2": 1}


class OfficialImportError(Exception):
    """An official checkpoint cannot be imported; the message says why and what to do."""


def _official_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="official MSDNet arguments", add_help=False, exit_on_error=False)
    p.add_argument("--data", default="cifar10", choices=["cifar10", "cifar100", "ImageNet"])
    p.add_argument("--arch", "-a", default="msdnet", choices=["msdnet"])
    p.add_argument("--reduction", type=float, default=0.5)
    p.add_argument("--nBlocks", type=int, default=1)
    p.add_argument("--nChannels", type=int, default=32)
    p.add_argument("--base", type=int, default=4)
    p.add_argument("--stepmode", choices=["even", "lin_grow"], default=None)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--growthRate", type=int, default=6)
    p.add_argument("--grFactor", default="1-2-4")
    p.add_argument("--prune", default="max", choices=["min", "max"])
    p.add_argument("--bnFactor", default="1-2-4")
    # Official: type=bool, so any non-empty word (even "False") means True; kept.
    p.add_argument("--bottleneck", type=bool, default=True)
    return p


def parse_official_args(text: str | list[str]) -> argparse.Namespace:
    """Parse the official command line (spellings and defaults of ``args.py``).

    ``--stepmode`` left out behaves as ``lin_grow`` (the official code tests
    ``== 'even'``); ``--bottleneck`` is Python's ``bool`` of its word, as there.
    Training-only options (``--save``, ``--lr``, ...) are accepted and ignored.

    Returns the namespace with ``grFactor`` and ``bnFactor`` as int lists and
    ``nScales``, ``num_classes`` added, as ``main.py`` does.

    Raises:
        OfficialImportError: on an unknown option or a bad value.
    """
    argv = shlex.split(text) if isinstance(text, str) else list(text)
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in _IGNORED:
            i += 1 + (_IGNORED[name] if "=" not in argv[i] else 0)
            continue
        kept.append(argv[i])
        i += 1
    try:
        args, unknown = _official_parser().parse_known_args(kept)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise OfficialImportError(f"bad official arguments {text!r}: {exc}") from exc
    if unknown:
        raise OfficialImportError(f"unknown official argument(s) {unknown}; the architecture options are "
                                  "--data --nBlocks --base --step --stepmode --nChannels --growthRate --grFactor "
                                  "--bnFactor --prune --reduction --bottleneck")
    try:
        args.grFactor = [int(f) for f in args.grFactor.split("-")]
        args.bnFactor = [int(f) for f in args.bnFactor.split("-")]
    except ValueError as exc:
        raise OfficialImportError(f"--grFactor/--bnFactor must be like 1-2-4: {exc}") from exc
    args.nScales = len(args.grFactor)
    args.num_classes = {"cifar10": 10, "cifar100": 100}.get(args.data, 1000)
    return args


def config_from_official(args: argparse.Namespace) -> MSDNetConfig:
    """The :class:`MSDNetConfig` of the network the official code builds from ``args``.

    CIFAR: 3x3 stem, 32x32 input, classifiers of 128 channels. ImageNet: 7x7
    stride-2 stem conv with bias + max pool, 224x224 input, classifiers as wide as
    their input.

    Raises:
        OfficialImportError: when the arguments describe no valid network.
    """
    cifar = args.data.startswith("cifar")
    try:
        return MSDNetConfig(
            n_blocks=args.nBlocks, base=args.base, step=args.step,
            step_mode="even" if args.stepmode == "even" else "lin_grow", n_channels=args.nChannels,
            growth_rate=args.growthRate, gr_factor=list(args.grFactor), bn_factor=list(args.bnFactor),
            prune=args.prune, reduction=args.reduction, bottleneck=bool(args.bottleneck),
            stem="cifar" if cifar else "imagenet", in_channels=3, num_classes=args.num_classes,
            image_size=32 if cifar else 224, classifier_channels=128 if cifar else None).validate()
    except ValueError as exc:
        raise OfficialImportError(f"the official arguments give no valid network: {exc}") from exc


def official_key_map(cfg: MSDNetConfig) -> dict[str, str]:
    """This project's state_dict key -> the official code's key, for ``cfg``.

    A pure function of the config (module prefixes are renamed, the rest of a key
    is kept; the inverse is ``{v: k for k, v in ...items()}``):

    - ``stem.convs.<s>.`` -> ``blocks.0.0.layers.<s>.net.`` (the ImageNet stem's
      first entry is a plain Sequential: ``blocks.0.0.layers.0.``);
    - MSD layer ``blocks.<b>.<i>.units.<j>.strided.`` / ``.regular.`` ->
      ``blocks.<b>.<e>.layers.<j>.conv_down.net.`` / ``.conv_normal.net.``, where
      entry ``e`` counts the stem (block 0) and the transitions before it;
    - its transition ``blocks.<b>.<i>.transition.<j>.`` -> ``blocks.<b>.<e+1>.m.<j>.net.``;
    - ``classifiers.<b>.features.<c>.`` -> ``classifier.<b>.m.<c>.net.`` (c = 0, 1),
      ``classifiers.<b>.linear.`` -> ``classifier.<b>.linear.``.
    """
    prefixes: dict[str, str] = {}
    for s in range(cfg.n_scales):
        first_imagenet = s == 0 and cfg.stem == "imagenet"
        prefixes[f"stem.convs.{s}."] = f"blocks.0.0.layers.{s}." + ("" if first_imagenet else "net.")
    plan = cfg.layer_plan()
    for b in range(cfg.n_blocks):
        entry = 1 if b == 0 else 0
        for i, spec in enumerate(sp for sp in plan if sp.block == b):
            for j in range(spec.out_scales):
                ours, off = f"blocks.{b}.{i}.units.{j}.", f"blocks.{b}.{entry}.layers.{j}."
                prefixes[ours + "strided."] = off + "conv_down.net."
                prefixes[ours + "regular."] = off + "conv_normal.net."
            entry += 1
            if spec.transition:
                for j in range(spec.out_scales):
                    prefixes[f"blocks.{b}.{i}.transition.{j}."] = f"blocks.{b}.{entry}.m.{j}.net."
                entry += 1
        for c in (0, 1):
            prefixes[f"classifiers.{b}.features.{c}."] = f"classifier.{b}.m.{c}.net."
        prefixes[f"classifiers.{b}.linear."] = f"classifier.{b}.linear."
    out = {}
    for key in MSDNet(cfg).state_dict():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:  # a module this map does not know: a bug, not a user error
            raise AssertionError(f"no official name for {key}")
        out[key] = prefixes[prefix] + key[len(prefix):]
    return out


def to_official(state_dict: dict, cfg: MSDNetConfig) -> dict:
    """This project's state_dict -> the official key names (what ``model.state_dict()``
    of the official MSDNet holds)."""
    names = official_key_map(cfg)
    return {names[k]: v for k, v in state_dict.items()}


def read_official(path: str | Path) -> dict:
    """The official weights of a file: ``main.py``'s dict (its ``state_dict``) or a
    bare state_dict, with DataParallel's ``module.`` prefix stripped.

    Raises:
        OfficialImportError: when the file is missing or unreadable, needs
            unpickling code (naming the object), or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise OfficialImportError(f"{path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc)))) or ["a Python object"]
        raise OfficialImportError(
            f"{path} holds pickled Python objects ({', '.join(found)}), not only tensors and plain values; "
            "refused: loading it would run code from the file. Re-save just the weights in a trusted "
            "environment: torch.save({'state_dict': ckpt['state_dict']}, 'weights.pth')") from exc
    except Exception as exc:  # torch.load raises many types on foreign bytes
        raise OfficialImportError(f"{path} is not a readable torch file: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise OfficialImportError(f"{path} holds neither main.py's checkpoint dict (with 'state_dict') "
                                  "nor a state_dict of tensors")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def from_official(official: dict, cfg: MSDNetConfig) -> dict:
    """Official state_dict -> this project's key names, after checking that it is
    exactly the network of ``cfg``.

    Raises:
        OfficialImportError: naming the first key whose shape differs (expected
            and found shapes), else the first missing or unexpected key.
    """
    names = official_key_map(cfg)
    expected = MSDNet(cfg).state_dict()
    for ours, off in names.items():
        if off in official and tuple(official[off].shape) != tuple(expected[ours].shape):
            raise OfficialImportError(
                f"the weights do not match the official arguments: {off} has shape {tuple(official[off].shape)}, "
                f"the arguments give {tuple(expected[ours].shape)}; check --nChannels, --growthRate, "
                "--grFactor, --bnFactor, --nBlocks, --base, --step, --stepmode, --data")
    missing = [off for off in names.values() if off not in official]
    extra = sorted(set(official) - set(names.values()))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise OfficialImportError(f"the weights do not match the official arguments: {len(missing)} key(s) "
                                  f"missing, {len(extra)} unexpected (first: {what}); check --nBlocks, --base, "
                                  "--step, --stepmode, --prune, --reduction, --bottleneck")
    return {ours: official[off] for ours, off in names.items()}


def import_official(path: str | Path, official_args: str, *, classes: list[str] | None = None,
                    contract: InputContract | None = None, command: str = ""):
    """Build a checkpoint of this project from an official checkpoint file.

    Returns a :class:`model.checkpoint.Checkpoint` (not yet saved, uncalibrated):
    the network of ``official_args`` with the file's weights, ``classes`` (default:
    CIFAR names, or ``class_0000``.. for ImageNet) and the input contract
    (default: the official data loader's test transforms for ``--data``).

    Raises:
        OfficialImportError: bad arguments, unreadable or unsafe file, or weights
            that do not match the arguments.
    """
    from . import checkpoint as ckpt

    args = parse_official_args(official_args)
    cfg = config_from_official(args)
    weights = from_official(read_official(path), cfg)
    if classes is None:
        classes = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}.get(
            args.data, [f"class_{i:04d}" for i in range(1000)])
    if len(classes) != cfg.num_classes:
        raise OfficialImportError(f"{len(classes)} class names for a network of {cfg.num_classes} classes")
    contract = (contract or OFFICIAL_TRANSFORMS[args.data]).validate()
    if contract.image_size != cfg.image_size:
        raise OfficialImportError(f"the preprocessing gives {contract.image_size}x{contract.image_size} images, "
                                  f"the official {args.data} network takes {cfg.image_size}x{cfg.image_size}")
    model = MSDNet(cfg)
    model.load_state_dict(weights)
    ck = ckpt.build(model, classes, list(contract.mean), list(contract.std),
                    validation=ckpt.ValidationSplit(ckpt.FOLDER),
                    card=ckpt.ModelCard(source="official MSDNet-PyTorch checkpoint", official_file=str(path),
                                        official_args=official_args, command=command))
    ck.transforms = contract
    return ck
