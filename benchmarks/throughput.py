"""Training throughput of one model on one data set, and the share of an epoch spent outside forward/backward.

The data-pipeline share is measured by running exactly the trainer's per-batch input path (index the device
tensor, crop/flip, convert to float) over a whole epoch's batches on its own, and dividing by a full epoch's time.

    python benchmarks/throughput.py --dataset cifar10 --data-root ../shared/data/cifar10-jpeg.tar.xz --model resnet20
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from bdguard.data import DataConfig
from bdguard.models import build_model
from bdguard.pipeline import prepare_data
from bdguard.training import TrainConfig, resolve_device
from bdguard.training.trainer import Trainer, batch_indices, epoch_generator, make_augment, steps_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="timed training epochs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    config = TrainConfig(model=args.model, batch_size=args.batch_size, epochs=args.epochs, device=args.device)
    device = resolve_device(config.device)
    bundle = prepare_data(DataConfig(dataset=args.dataset, data_root=args.data_root), device)
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
        trainer.inputs(train.images[idx], generator)
        train.labels[idx]
    sync()
    data_seconds = time.perf_counter() - began

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
                "images_per_second": round(len(train) / best, 1),
                "data_pipeline_seconds_per_epoch": round(data_seconds, 3),
                "data_pipeline_share": round(data_seconds / best, 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
