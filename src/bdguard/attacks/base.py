"""The attack interface: poison a training set (keeping the poison mask apart) and trigger test images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from bdguard.config import NoParams, check_range, check_seed, from_dict, with_preset
from bdguard.data.base import DataBundle, ImageSet, PoisonedSet, TriggeredSet
from bdguard.errors import BdguardError


@dataclass
class AttackConfig:
    """Settings every attack shares; `params` holds the attack's own options (its `Params` dataclass)."""

    name: str = "none"
    target: int = 0
    mode: Literal["all2one", "all2all"] = "all2one"
    rate: float = 0.1
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_range("attack rate", self.rate, 0.0, 1.0)
        check_range("attack target", self.target, 0)
        check_seed("attack.seed", self.seed)


@dataclass(frozen=True)
class AttackContext:
    """Where and how an attack that learns its trigger may train: the device, a cache folder, quiet output."""

    device: torch.device
    cache_dir: Path
    quiet: bool = False


class Attack(ABC):
    """Base of every attack. A subclass sets `name`, `Params` and implements `apply`.

    `rate` is the fraction of the whole training set for poison-label attacks and of the target class for
    clean-label ones (`clean_label = True`); the manifest records which.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    clean_label: ClassVar[bool] = False
    has_trigger: ClassVar[bool] = True

    def __init__(self, config: AttackConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        if config.target >= num_classes:
            raise BdguardError(f"attack target {config.target} is not a class (the data set has {num_classes})")
        if config.mode == "all2all" and self.clean_label:
            raise BdguardError(f"attack {self.name} is clean-label and supports only mode all2one")
        self.config = config
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.params = self.parse_params(config.params)

    @classmethod
    def parse_params(cls, params: dict[str, Any]) -> Any:
        """The attack's `Params` from a dict of settings over its named preset: validated without any data, so a
        grid of runs can refuse a bad option before the first one starts."""
        settings = with_preset(params, cls.presets, f"attack {cls.name}", record=False)
        return from_dict(cls.Params, settings, prefix=f"{cls.name}.")

    def prepare(self, bundle: DataBundle, context: AttackContext) -> None:  # noqa: B027 (an optional hook)
        """Learn whatever the trigger needs from clean data before `poison`/`test_set` (a generator, a surrogate
        model, an optimised mask), cached under `context.cache_dir`. Fixed-trigger attacks need nothing."""

    @property
    def rate_meaning(self) -> str:
        return "fraction of the target class" if self.clean_label else "fraction of the whole training set"

    @abstractmethod
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Insert the trigger into a batch of uint8 images (N, C, H, W); returns new uint8 images."""

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "all2all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.config.target)

    def select(self, labels: torch.Tensor) -> torch.Tensor:
        """Seeded boolean mask of the samples to poison: round(rate x eligible) of the eligible ones."""
        eligible = (labels == self.config.target) if self.clean_label else torch.ones_like(labels, dtype=torch.bool)
        candidates = eligible.nonzero().squeeze(1).cpu()
        count = round(self.config.rate * candidates.numel())
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
        mask = torch.zeros(labels.shape[0], dtype=torch.bool)
        mask[chosen] = True
        return mask.to(labels.device)

    def check_cross_ratio(self, cross_ratio: float) -> None:
        """Attacks with cross samples use rate x (1 + cross_ratio) of the set, which must fit in it."""
        if self.config.rate * (1 + cross_ratio) > 1 + 1e-9:  # slack for float rounding when the two fill the set
            raise BdguardError(
                f"{self.name} poisons rate x (1 + cross_ratio) of the set, which must be <= 1; "
                f"got rate {self.config.rate} and {self.name}.cross_ratio {cross_ratio}"
            )

    def _check_shape(self, data: ImageSet) -> None:
        if data.image_shape != tuple(self.image_shape):
            raise BdguardError(
                f"attack {self.name} was built for {tuple(self.image_shape)} images, got {data.image_shape}"
            )

    def poison(self, train: ImageSet) -> PoisonedSet:
        self._check_shape(train)
        mask = self.select(train.labels)
        images = train.images.clone()
        labels = train.labels.clone()
        images[mask] = self.apply(train.images[mask])
        if not self.clean_label:
            labels[mask] = self.target_labels(train.labels[mask])
        cross = torch.zeros_like(mask)
        return PoisonedSet(ImageSet(images, labels, train.files), mask, cross, train.labels, self.manifest(mask, cross))

    def poison_with_cross(
        self,
        train: ImageSet,
        cross_ratio: float,
        make_cross: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    ) -> PoisonedSet:
        """Poisoning with cross (noise) samples, as WaNet and IAD do: one seeded permutation of all indices; its first
        round(rate x N) samples get the trigger and the attacker's labels, the next round(cross_ratio x rate x N) keep
        their labels and get the images `make_cross(index, generator)` returns for `train.images[index]`. The
        generator continues the permutation's seeded CPU stream, so the cross images are repeatable too."""
        self._check_shape(train)
        n = len(train)
        generator = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(n, generator=generator).to(train.device)
        n_poison = round(self.config.rate * n)
        n_cross = min(round(cross_ratio * self.config.rate * n), n - n_poison)
        poison_index, cross_index = order[:n_poison], order[n_poison : n_poison + n_cross]

        images, labels = train.images.clone(), train.labels.clone()
        images[poison_index] = self.apply(train.images[poison_index])
        labels[poison_index] = self.target_labels(train.labels[poison_index])
        images[cross_index] = make_cross(cross_index, generator)

        poison_mask = torch.zeros(n, dtype=torch.bool, device=train.device)
        cross_mask = torch.zeros_like(poison_mask)
        poison_mask[poison_index] = True
        cross_mask[cross_index] = True
        manifest = self.manifest(poison_mask, cross_mask)
        return PoisonedSet(ImageSet(images, labels, train.files), poison_mask, cross_mask, train.labels, manifest)

    def test_set(self, test: ImageSet) -> TriggeredSet:
        """Triggered test images; all-to-one leaves out images already of the target class."""
        self._check_shape(test)
        if self.config.mode == "all2one":
            keep = test.labels != self.config.target
        else:
            keep = torch.ones_like(test.labels, dtype=torch.bool)
        images, labels = test.images[keep], test.labels[keep]
        return TriggeredSet(self.apply(images), labels, self.target_labels(labels))

    def manifest(self, poison_mask: torch.Tensor, cross_mask: torch.Tensor) -> dict[str, Any]:
        return {
            "attack": self.name,
            "target": self.config.target,
            "mode": self.config.mode,
            "rate": self.config.rate,
            "rate_meaning": self.rate_meaning,
            "clean_label": self.clean_label,
            "seed": self.config.seed,
            "params": dict(vars(self.params)),
            "poisoned": int(poison_mask.sum()),
            "cross": int(cross_mask.sum()),
            "total": int(poison_mask.numel()),
        }
