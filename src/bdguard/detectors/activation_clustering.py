"""activation-clustering: Activation Clustering (Chen et al., SafeAI@AAAI 2019). Per label, the pooled features
of a model trained on the set are reduced to `dims` independent components (FastICA) and split in two by k-means;
a label whose smaller cluster holds at most `size_threshold` of it is judged poisoned, and that cluster flagged.

The method gives hard flags only. For a threshold-free ranking each sample gets its margin toward its label's
smaller cluster, (d_large - d_small) / (d_large + d_small) in [-1, 1], plus 2 when its label was judged poisoned,
so the flagged clusters rank first (docs/methods/detectors.md)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from bdguard.analysis.activation_norms import pooled_features
from bdguard.config import check_range
from bdguard.detectors.base import Detection, DetectionJob, Detector
from bdguard.detectors.registry import DETECTORS

POISONED_LABEL_BONUS = 2.0  # above any margin: samples of a label judged poisoned rank first


@dataclass
class ActivationClusteringParams:
    dims: int = 10  # independent components per label (the authors: 10)
    size_threshold: float = 0.35  # smaller cluster at most this share of its label: poisoned (the authors: 0.35)

    def __post_init__(self) -> None:
        check_range("activation-clustering.dims", self.dims, 1)
        check_range("activation-clustering.size_threshold", self.size_threshold, 0.0, 0.5)


def two_means(features: np.ndarray, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(in the smaller cluster: bool (n,), margin toward it: float (n,)) of one label's features."""
    # imported here: scikit-learn is slow to import and only this detector clusters
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    n = features.shape[0]
    if n < 2:
        return np.zeros(n, dtype=bool), np.full(n, -1.0)
    components = min(dims, features.shape[1], n)
    with warnings.catch_warnings():
        # an unconverged ICA still gives usable axes for 2-means; one warning per label would bury the log
        warnings.simplefilter("ignore", ConvergenceWarning)
        reduced = FastICA(n_components=components, random_state=seed, max_iter=1000, tol=1e-3).fit_transform(features)
    kmeans = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(reduced)
    small = int(np.argmin(np.bincount(kmeans.labels_, minlength=2)))
    distances = kmeans.transform(reduced)  # (n, 2): to each centre
    near_small, near_large = distances[:, small], distances[:, 1 - small]
    margin = (near_large - near_small) / np.maximum(near_large + near_small, 1e-12)
    return kmeans.labels_ == small, margin


@DETECTORS.register
class ActivationClustering(Detector):
    name = "activation-clustering"
    description = "Activation Clustering (Chen et al., 2019): per label, ICA then 2-means; a small cluster is poison"
    uses_model = True
    reads_feature_map = True
    Params = ActivationClusteringParams

    def detect(self, job: DetectionJob) -> Detection:
        features = pooled_features(job.model(), job.data.images, job.train.eval_batch_size)
        features, labels = features.cpu().double().numpy(), job.data.labels.cpu().numpy()
        scores, flagged = np.zeros(labels.size), np.zeros(labels.size, dtype=bool)
        sizes = {}
        for label in np.unique(labels).tolist():
            members = np.flatnonzero(labels == label)
            small, margin = two_means(features[members], self.params.dims, job.seed)
            sizes[label] = share = float(small.mean())
            poisoned = share <= self.params.size_threshold
            scores[members] = margin + (POISONED_LABEL_BONUS if poisoned else 0.0)
            flagged[members] = small & poisoned
        return Detection(
            torch.from_numpy(scores).float(),
            torch.from_numpy(flagged),
            f"the smaller 2-means cluster of labels where it holds <= {self.params.size_threshold:g}",
            {"smaller_cluster_share": sizes},
        )
