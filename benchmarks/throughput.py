"""Training throughput of one model on one data set, the share of an epoch spent outside forward/backward, and how
close the trainer comes to the limit: a bare PyTorch loop (one fixed batch, forward, backward, SGD step, in the same
memory format) on the same model and batch size.

The data-pipeline share is measured by running exactly the trainer's per-batch input path (index the device
tensor, crop/flip, convert to float) over a whole epoch's batches on its own, and dividing by a full epoch's time.

    python benchmarks/throughput.py --dataset cifar10 --data-root ../shared/data/cifar10-jpeg.tar.xz --model resnet20
    python benchmarks/throughput.py --dataset cifar10 --train-size 5000 --model torchvision:resnet18 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from bdguard.data import DataConfig
from bdguard.models import build_model
from bdguard.runs.common import prepare_data
from bdguard.training import TrainConfig, resolve_device
from bdguard.training.runtime import Runtime, batch_indices, epoch_generator, steps_per_epoch
from bdguard.training.trainer import Trainer, make_augment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root")
    parser.add_argument("--model", default="resnet20", help="an architecture, e.g. resnet18 or torchvision:resnet18")
    parser.add_argument("--train-size", type=int, help="time an epoch of this many training images (a seeded subset)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="timed training epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-channels-last", action="store_true", help="train in the default (NCHW) memory format")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        epochs=args.epochs,
        device=args.device,
        channels_last=not args.no_channels_last,
    )
    device = resolve_device(config.device)
    data = DataConfig(dataset=args.dataset, data_root=args.data_root, train_size=args.train_size)
    bundle = prepare_data(data, device)
    model = build_model(args.model, bundle.num_classes, bundle.image_shape[0], bundle.mean, bundle.std).to(device)
    train = bundle.train
    steps = steps_per_epoch(len(train), config.batch_size)
    trainer = Trainer(model, config, device, make_augment(config, bundle.flip), steps)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    epoch_seconds = []
    for epoch in range(1, args.epochs + 1):
        sync()
        began = time.perf_counter()
        trainer.train_epoch(train, epoch, quiet=True)
        sync()
        epoch_seconds.append(time.perf_counter() - began)

    generator = epoch_generator(config.seed, 1, device)
    sync()
    began = time.perf_counter()
    for idx in batch_indices(len(train), config.batch_size, generator):
        images = train.images[idx]
        if trainer.augment is not None:
            images = trainer.augment(images, generator)
        trainer.runtime.inputs(images)
        train.labels[idx]
    sync()
    data_seconds = time.perf_counter() - began

    bare = bare_loop(args.model, bundle, config, device, steps, sync)
    best = min(epoch_seconds)
    print(
        json.dumps(
            {
                "dataset": bundle.name,
                "model": args.model,
                "params": sum(p.numel() for p in model.parameters()),
                "batch_size": config.batch_size,
                "device": str(device),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                "torch": torch.__version__,
                "epoch_seconds": [round(s, 2) for s in epoch_seconds],
                "channels_last": config.channels_last,
                "images_per_second": round(len(train) / best, 1),
                "bare_loop_images_per_second": round(bare, 1),
                "trainer_share_of_bare_loop": round(len(train) / best / bare, 3),
                "data_pipeline_seconds_per_epoch": round(data_seconds, 3),
                "data_pipeline_share": round(data_seconds / best, 4),
            },
            indent=2,
        )
    )


def bare_loop(name: str, bundle, config: TrainConfig, device: torch.device, steps: int, sync) -> float:
    """Images per second of the plainest loop on one fixed float batch: the most the trainer could reach."""
    model = build_model(name, bundle.num_classes, bundle.image_shape[0], bundle.mean, bundle.std).to(device)
    runtime = Runtime(device, config.amp, config.channels_last)
    runtime.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = runtime.inputs(bundle.train.images[: config.batch_size])
    y = bundle.train.labels[: config.batch_size]
    model.train()
    for step in range(steps + 5):
        if step == 5:  # the first steps warm the allocator and kernels up
            sync()
            began = time.perf_counter()
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return steps * config.batch_size / (time.perf_counter() - began)


if __name__ == "__main__":
    main()
