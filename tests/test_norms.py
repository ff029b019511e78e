import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from bdguard.analysis.activation_norms import (
    activation_stats,
    auroc,
    channel_norms,
    clean_summary,
    pooled_features,
    shift_summary,
)
from bdguard.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_norms_of_a_2x3_map_match_hand_computed_values():
    # two images, two channels of 2x3; channel 1 has negative entries, whose magnitude counts
    maps = torch.tensor(
        [
            [[[1.0, 2.0, 0.0], [0.0, 2.0, 4.0]], [[-3.0, 0.0, 0.0], [0.0, 0.0, 4.0]]],
            [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]],
        ]
    )
    norms = channel_norms(maps)
    assert set(norms) == {"1", "2", "inf"}
    assert all(value.shape == (2, 2) for value in norms.values())  # (K, N)
    assert norms["1"].tolist() == [[9.0, 0.0], [7.0, 6.0]]
    # sqrt(1 + 4 + 4 + 16) and sqrt(9 + 16)
    torch.testing.assert_close(norms["2"], torch.tensor([[5.0, 0.0], [5.0, math.sqrt(6.0)]]))
    assert norms["inf"].tolist() == [[4.0, 0.0], [4.0, 1.0]]
    assert all(value.dtype == torch.float32 for value in channel_norms(maps.half()).values())


def test_auroc_sign_ties_and_agreement_with_sklearn():
    clean = torch.tensor([[0.0, 1.0, 2.0], [5.0, 6.0, 7.0], [1.0, 1.0, 1.0]])
    triggered = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    # channel 0: the trigger raises every value (1); channel 1: it lowers them (0); channel 2: all ties (1/2)
    assert auroc(clean, triggered).tolist() == [1.0, 0.0, 0.5]

    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 5, (4, 30), generator=generator).float()  # many ties
    triggered = torch.randint(1, 7, (4, 20), generator=generator).float()
    ours = auroc(clean, triggered)
    for k in range(4):
        truth = [0] * 30 + [1] * 20  # the triggered images are the positives
        expected = roc_auc_score(truth, torch.cat([clean[k], triggered[k]]).numpy())
        assert float(ours[k]) == pytest.approx(expected, abs=1e-6)
    assert float(ours.mean()) > 0.5


def test_shift_summary():
    clean = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    triggered = torch.tensor([[4.0, 6.0], [2.0, 2.0]])
    s = shift_summary(clean, triggered)
    assert s["mean_clean"].tolist() == [2.0, 0.0] and s["std_clean"].tolist() == [1.0, 0.0]  # population std
    assert s["mean_trig"].tolist() == [5.0, 2.0] and s["diff"].tolist() == [3.0, 2.0]
    assert s["rel"][0] == pytest.approx(1.5) and s["z"][0] == pytest.approx(3.0)
    assert s["rel"][1] > 1e7 and torch.isfinite(s["z"]).all()  # a dead channel that the trigger wakes
    assert s["auroc"].tolist() == [1.0, 1.0]
    assert set(clean_summary(clean)) == {"mean_clean", "std_clean"}


def test_activation_stats_are_batched_in_eval_mode_without_grad():
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 3, [0.5] * 3, [0.25] * 3)
    model.train()
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    whole = activation_stats(model, images, batch_size=256)
    split = activation_stats(model, images, batch_size=3)
    assert model.training  # the caller's mode is restored
    assert set(whole) == {"1", "2", "inf", "avg"}
    for key in whole:
        assert whole[key].shape == (128, 7) and not whole[key].requires_grad
        torch.testing.assert_close(whole[key], split[key])
    with torch.no_grad():
        maps = model.eval().features(images.float() / 255)
    torch.testing.assert_close(whole["inf"], maps.flatten(2).amax(2).T)
    torch.testing.assert_close(whole["avg"], pooled_features(model, images).T)  # post-ReLU: l1 / (h w) too
    torch.testing.assert_close(whole["avg"], whole["1"] / 16)
