"""Tiny trained models with a known answer, shared by the Neural Cleanse, Grad-CAM and analyze tests (trained once
per test session, in seconds, on the offline synthetic set)."""

import copy
from functools import cache

import torch

from bdguard.attacks import AttackConfig, build_attack
from bdguard.data import DataBundle, DataConfig, ImageSet, load_dataset
from bdguard.defenses import RepairJob, TrainingJob
from bdguard.training import Evaluator, TrainConfig, evaluate, fit
from bdguard.training.factory import new_model
from bdguard.training.runtime import steps_per_epoch
from bdguard.training.trainer import Trainer

TARGET = 3
PATCH = 4  # a 4x4 checkerboard in the bottom-right corner of the 16x16 images
ATTACK = AttackConfig(name="badnets", target=TARGET, rate=0.1, params={"patch_size": PATCH})
TRAIN = TrainConfig(model="small-cnn", batch_size=64, epochs=3, lr=0.05, augment=False, device="cpu", threads=1)
DECOYS = 400  # training images with the patch elsewhere and their true label


def patch_region() -> torch.Tensor:
    """bool (16, 16): where the planted patch sits."""
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[-PATCH:, -PATCH:] = True
    return region


def _train(train: ImageSet, epochs: int):
    bundle = data()
    model = new_model(bundle, TRAIN, torch.device("cpu"))
    config = TrainConfig(**{**vars(TRAIN), "epochs": epochs})
    trainer = Trainer(model, config, torch.device("cpu"), None, steps_per_epoch(len(train), config.batch_size))
    fit(trainer, train, lambda m: {}, quiet=True)
    return model.eval()


@cache
def data():
    return load_dataset(DataConfig(dataset="synthetic"))


@cache
def backdoored():
    """A small-cnn whose backdoor fires only for the patch in its corner.

    A CNN with global average pooling learns a patch trigger almost anywhere in the image, so Neural Cleanse may
    rightly find a smaller trigger elsewhere. Decoys (the patch at other places, true labels kept) tie the
    backdoor to the corner, so a reversed mask can be checked against where the patch really is.
    """
    bundle = data()
    attack = build_attack(ATTACK, bundle.num_classes, bundle.image_shape)
    poisoned = attack.poison(bundle.train)
    generator = torch.Generator().manual_seed(1)
    chosen = torch.randperm(len(bundle.train), generator=generator)[:DECOYS]
    decoys = bundle.train.images[chosen].clone()
    patch = attack.pattern[:, -PATCH:, -PATCH:]
    corners = torch.randint(0, 16 - 2 * PATCH + 1, (DECOYS, 2), generator=generator)  # never near the corner
    for image, (row, col) in zip(decoys, corners.tolist(), strict=True):
        image[:, row : row + PATCH, col : col + PATCH] = patch
    train = ImageSet(
        torch.cat([poisoned.train.images, decoys]), torch.cat([poisoned.train.labels, bundle.train.labels[chosen]])
    )
    return _train(train, TRAIN.epochs), attack


@cache
def clean():
    """The same architecture trained on clean data only (one epoch: enough to classify, no backdoor)."""
    return _train(data().train, 1)


def training_job(
    bundle: DataBundle, attack: AttackConfig, train: TrainConfig, run_dir=None, fingerprint="test", resume=False
) -> TrainingJob:
    """A training defense's job on `bundle` poisoned by `attack`, on the CPU, as `bdguard train` builds it."""
    built = build_attack(attack, bundle.num_classes, bundle.image_shape)
    poisoned, triggered = built.poison(bundle.train), built.test_set(bundle.test)
    device = torch.device("cpu")
    return TrainingJob(
        bundle=bundle,
        poisoned=poisoned,
        triggered=triggered,
        train=train,
        device=device,
        new_model=lambda: new_model(bundle, train, device),
        evaluate=lambda model: evaluate(model, bundle.test, triggered),
        run_dir=run_dir,
        fingerprint=fingerprint,
        resume=resume,
        quiet=True,
    )


def repair_job(probe: ImageSet, rest: ImageSet, train: TrainConfig, run_dir=None) -> RepairJob:
    """A post-training defense's job on a copy of `backdoored()`: `probe` is its clean data, `rest` what BA and
    ASR are measured on; it never sees the real trigger."""
    model, attack = backdoored()
    return RepairJob(
        model=copy.deepcopy(model),
        bundle=data(),
        probe=probe,
        oracle=None,
        target=None,
        evaluate=Evaluator(rest, attack.test_set(rest)),
        train=train,
        device=torch.device("cpu"),
        run_dir=run_dir,
        quiet=True,
        seed=0,
    )
