"""CLI flags as dotted keys of `RunConfig`, so the command line and a config file fill the same object."""

from __future__ import annotations

import argparse
from typing import Any

from bdguard.attacks import ATTACKS
from bdguard.config import from_dict, load_file, merge, parse_assignments, set_dotted, to_dict
from bdguard.data import DataConfig
from bdguard.data.loading import class_index
from bdguard.defenses import DEFENSES
from bdguard.detectors import DETECTORS
from bdguard.errors import BdguardError
from bdguard.runs.train import RunConfig

SECTIONS = ("data", "attack", "defense", "detector", "probe", "train", "gallery")  # each command takes its own

# (flag, dotted key in RunConfig, extra argparse settings)
DATA_FLAGS = [
    ("--dataset", "data.dataset", {"help": "data set name, imagefolder:<path> or hf:<path> (see `bdguard datasets`)"}),
    ("--data-root", "data.data_root", {"help": "where the data set is: a folder or archive"}),
    (
        "--download",
        "data.download",
        {"action": "store_const", "const": True, "help": "allow downloads (data sets, hf: names)"},
    ),
    ("--image-size", "data.image_size", {"help": "resize images to this square size"}),
    ("--train-size", "data.train_size", {"help": "train on this many images (a fixed seeded subset)"}),
]
EXCLUDE_FLAGS = [
    (
        "--exclude",
        "data.exclude",
        {
            "help": "leave out these training samples: a .npy of flags (detect's flagged.npy) or of indices, or a "
            "text file of file names (one per line, as in detect's scores.csv)"
        },
    ),
]
ATTACK_FLAGS = [
    ("--attack", "attack.name", {"help": "attack name (see `bdguard attacks`)"}),
    ("--target", "attack.target", {"help": "target class: its index, or its name (e.g. --target cat)"}),
    ("--mode", "attack.mode", {"help": "all2one or all2all"}),
    ("--rate", "attack.rate", {"help": "poisoning rate (the attack's manifest says of what)"}),
    ("--attack-seed", "attack.seed", {"help": "seed of the poisoned-sample choice and generated triggers"}),
]
DEVICE_FLAGS = [
    ("--device", "train.device", {"help": "auto, cpu, cuda, cuda:N or mps"}),
    ("--threads", "train.threads", {"help": "CPU threads for torch (0: torch's default)"}),
]
TRAIN_FLAGS = [
    ("--defense", "defense.name", {"help": "defense name (see `bdguard defenses`)"}),
    (("--arch", "--model"), "train.model", {"help": "architecture (see `bdguard models`)"}),
    ("--epochs", "train.epochs", {}),
    ("--batch-size", "train.batch_size", {}),
    ("--optimizer", "train.optimizer", {"help": "sgd or adam"}),
    ("--lr", "train.lr", {"help": "base learning rate"}),
    ("--schedule", "train.schedule", {"help": "cosine, step, onecycle or constant"}),
    ("--label-smoothing", "train.label_smoothing", {}),
    ("--no-augment", "train.augment", {"action": "store_const", "const": False, "help": "train without crop/flip"}),
    ("--seed", "train.seed", {"help": "training seed"}),
    *DEVICE_FLAGS,
]


def _default(dotted: str, config_cls: type = RunConfig) -> Any:
    """The default of a dotted key in `config_cls`; None where a section defaults to None or does not exist (an
    `analyze` config has no defense)."""
    node: Any = to_dict(config_cls())
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


Flag = tuple[str | tuple[str, ...], str, dict]  # (flag or (flag, alias...), dotted key, extra argparse settings)


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], config_cls: type = RunConfig) -> None:
    for flag, dotted, extra in flags:
        names = (flag,) if isinstance(flag, str) else flag  # the first name, and any aliases
        extra = dict(extra)
        text = extra.pop("help", "")
        default = _default(dotted, config_cls)
        if "action" not in extra:
            text = f"{text} (default: {default})" if text else f"default: {default}"
            extra["metavar"] = names[0].lstrip("-").replace("-", "_").upper()
        parser.add_argument(*names, dest=dotted, default=None, help=text, **extra)


def add_config_flags(parser: argparse.ArgumentParser, set_help: str) -> None:
    parser.add_argument("--config", help="a TOML or YAML file of settings (sections data, attack, defense, train)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def _chosen_elsewhere(head: str, names: dict[str, str | None]) -> str | None:
    """The kind (attack, defense, detector) that `head` names one of, when this command has that kind but chose
    another: a setting for something not in the run."""
    registries = {"attack": ATTACKS, "defense": DEFENSES, "detector": DETECTORS}
    return next((kind for kind, registry in registries.items() if names[kind] is not None and head in registry), None)


def _without_replaced_params(base: dict[str, Any], given: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`base` less the options of an attack, defense or detector that the file or a flag replaces by another."""
    base = dict(base)
    for kind in ("attack", "defense", "detector"):
        named = given.get(kind)
        name = vars(args).get(f"{kind}.name") or (named.get("name") if isinstance(named, dict) else None)
        section = base.get(kind)
        if name and isinstance(section, dict) and section.get("name") != name:
            base[kind] = {key: value for key, value in section.items() if key != "params"}
    return base


def _named_target(tree: dict[str, Any]) -> None:
    """`--target T-shirt/top`: a class name becomes its index (a number stays as it is)."""
    attack = tree.get("attack")
    target = attack.get("target") if isinstance(attack, dict) else None
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
        attack["target"] = class_index(from_dict(DataConfig, data, "data."), target)


def config_tree(
    args: argparse.Namespace, primary: str = "attack", config_cls: type = RunConfig, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults < `base` (a resumed run's recorded settings) < --config file < flags < --set, as a nested dict of
    the sections given (for `config_cls`).

    A `--set` key is a full path (`train.momentum=0.8`), or starts with the chosen attack's, defense's or
    detector's name (`badnets.patch_size=4`), or is bare, in which case it belongs to the `primary` section's params.
    """
    given = load_file(args.config) if getattr(args, "config", None) else {}
    tree = merge(_without_replaced_params(base or {}, given, args), given)
    for dotted, value in vars(args).items():
        if value is not None and dotted.split(".")[0] in SECTIONS:
            set_dotted(tree, dotted, value)
    names = {
        kind: tree.get(kind, {}).get("name", _default(f"{kind}.name", config_cls))
        for kind in ("attack", "defense", "detector")
    }
    for key, value in parse_assignments(getattr(args, "set", None)).items():
        head, _, rest = key.partition(".")
        if head in SECTIONS and rest:
            set_dotted(tree, key, value)
        elif not rest and head in SECTIONS:
            raise BdguardError(
                f"--set {key}={value}: {head} is a section of settings; name one of its keys ({head}.KEY=VALUE)"
            )
        elif rest and head in names.values():
            section = next(kind for kind, name in names.items() if name == head)
            set_dotted(tree, f"{section}.params.{rest}", value)
        elif rest and (kind := _chosen_elsewhere(head, names)) is not None:
            raise BdguardError(
                f"--set {key}: {head} is not the chosen {kind} ({names[kind]}); pass --{kind} {head}, or drop the "
                "setting"
            )
        else:
            set_dotted(tree, f"{primary}.params.{key}", value)
    _named_target(tree)
    return tree


def run_config(args: argparse.Namespace, primary: str = "attack", base: dict[str, Any] | None = None) -> RunConfig:
    """The typed, validated RunConfig of `config_tree`."""
    return RunConfig.from_dict(config_tree(args, primary, base=base))


def add_probe_command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    description: str,
    flags: list[Flag],
    config_cls: type,
    set_help: str,
    aliases: list[str] | None = None,
) -> argparse.ArgumentParser:
    """A command that reads a trained model on the probe set (`repair`, `analyze`): --model, the data and attack
    flags, `flags` (their defaults from `config_cls`), --config/--set, --out and --quiet."""
    parser = sub.add_parser(
        name,
        aliases=aliases or [],
        help=summary,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a model.safetensors written by bdguard")
    add_flags(parser, DATA_FLAGS + ATTACK_FLAGS)
    add_flags(parser, flags, config_cls)
    add_config_flags(parser, set_help)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only plain log lines")
    return parser
