"""strip: STRIP (Gao et al., ACSAC 2019). Each image is blended with `overlays` clean images, (1 - w) x + w overlay,
and the model's mean prediction entropy over them is measured: a trigger keeps the prediction fixed whatever is laid
over it, so low entropy = poisoned. The authors add the two images and saturate (cv2.addWeighted(1, 1)), which
turns every dark trigger pixel into the overlay's: a black-and-white BadNets patch lost to it on our test set
(AUROC 0.32); the blend (TrojanZoo's form, w = 0.5) keeps half of any trigger's contrast. The overlays and the
threshold come from the clean held-out test split: flagged = entropy below its `frr` quantile on clean test images
(the authors fix the false rejection rate at 1 %)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdguard.config import check_range
from bdguard.data.augment import to_float
from bdguard.detectors.base import Detection, DetectionJob, Detector
from bdguard.detectors.registry import DETECTORS
from bdguard.models.base import BackdoorModel
from bdguard.progress import progress_bar
from bdguard.training.runtime import autocast


@dataclass
class StripParams:
    overlays: int = 20  # clean images laid over each one (the paper: 100; 20 keeps a 20,000-image set to minutes)
    weight: float = 0.5  # of the overlay in the blend (TrojanZoo: 0.5)
    frr: float = 0.01  # the clean false-rejection rate that sets the threshold (the paper: 1 %)
    clean_images: int = 1000  # held-out test images: the overlay pool and the threshold's clean sample

    def __post_init__(self) -> None:
        check_range("strip.overlays", self.overlays, 1)
        check_range("strip.weight", self.weight, 0.0, 1.0)
        check_range("strip.frr", self.frr, 0.0, 1.0)
        check_range("strip.clean_images", self.clean_images, 2)


@torch.no_grad()
def strip_entropy(
    model: BackdoorModel,
    images: torch.Tensor,
    pool: torch.Tensor,
    overlays: int,
    weight: float,
    generator: torch.Generator,
    batch_size: int,
    amp: bool,
    quiet: bool = True,
) -> torch.Tensor:
    """(N,) mean normalised prediction entropy of each uint8 image blended with `overlays` images drawn from
    `pool` (`weight` on the overlay)."""
    model.eval()
    per_batch = max(1, batch_size // overlays)
    out = []
    with progress_bar("STRIP", -(-images.shape[0] // per_batch), quiet) as bar:
        for start in range(0, images.shape[0], per_batch):
            batch = images[start : start + per_batch]
            drawn = torch.randint(0, pool.shape[0], (batch.shape[0], overlays), generator=generator)
            laid = pool[drawn.to(pool.device)]  # (n, overlays, C, H, W)
            x = to_float(torch.lerp(batch[:, None].float(), laid.float(), weight).round_().flatten(0, 1))
            with autocast(x.device, amp):
                logits = model(x)
            probs = F.softmax(logits.float(), dim=1)
            entropy = -torch.xlogy(probs, probs).sum(dim=1) / probs.shape[1]
            out.append(entropy.view(batch.shape[0], overlays).mean(dim=1))
            bar.update(1)
    return torch.cat(out)


@DETECTORS.register
class Strip(Detector):
    name = "strip"
    description = "STRIP (Gao et al., ACSAC 2019): prediction entropy under superimposed clean images"
    uses_model = True
    reads_held_out = True
    Params = StripParams

    def detect(self, job: DetectionJob) -> Detection:
        model, test, params = job.model(), job.bundle.test, self.params
        generator = torch.Generator().manual_seed(job.seed)
        chosen = torch.randperm(len(test), generator=generator)[: params.clean_images].to(test.images.device)
        pool = test.images[chosen]
        args = (params.overlays, params.weight, generator, job.train.eval_batch_size, job.train.amp)
        # the clean sample's images are laid over each other: an image over itself would only add brightness
        half = pool.shape[0] // 2
        clean = strip_entropy(model, pool[:half], pool[half:], *args)
        cut = float(torch.quantile(clean, params.frr))
        entropy = strip_entropy(model, job.data.images, pool, *args, quiet=job.quiet)
        return Detection(
            -entropy,
            entropy < cut,
            f"entropy < {cut:.4g}, the {params.frr:g} quantile on {half} clean test images",
            {"clean_entropy_quantile": cut},
        )
