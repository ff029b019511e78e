"""results.json as one typed, versioned record (bdguard.results): what every command writes and the bench and the
report read back."""

import pytest

from bdguard.errors import BdguardError
from bdguard.results import SCHEMA, DetectionResult, Plots, RunResult, Scores

# a train results.json as bdguard wrote it before the `schema`, `command` and `plots` fields existed
OLD_TRAIN = {
    "ba": 0.85,
    "asr": 0.01,
    "ra": 0.8,
    "dataset": "fashion-mnist",
    "attack": "badnets",
    "defense": "vab",
    "model": "small-cnn",
    "epochs": 10,
    "seconds": 160.2,
    "poisoned": 2000,
    "train_size": 20000,
    "target": 0,
    "detector": {"flagged": 1, "tpr": 0.99, "fpr": 0.01, "precision": 0.9, "auroc": 0.91, "auprc": 0.8},
    "pruned_fraction": None,
    "backdoor_flagged": None,
    "figures": [{"file": "entropy_hist.png", "caption": "entropy"}],
    "vab": {"split": {"rounds": 7}},
    "environment": {"command": "bdguard train --defense vab"},
}


def test_a_result_round_trips_and_carries_its_schema():
    result = RunResult(
        command="repair",
        scores=Scores(0.8, 0.1, 0.7),
        dataset="synthetic",
        attack="badnets",
        defense="linf-prune",
        model="small-cnn",
        epochs=3,
        seconds=1.5,
        environment={"command": "bdguard repair"},
        target=0,
        before=Scores(0.85, 1.0, 0.0),
        probe={"source": "test-holdout", "size": 500, "seed": 0},
        eval_size=9500,
        model_path="m.safetensors",
        pruned_fraction=0.0625,
        plots=Plots({"probe_asr": "probe ASR"}, None, "scores.csv"),
        details={"channels": [1, 2]},
    )
    data = result.to_json()
    assert data["schema"] == SCHEMA and data["linf-prune"] == {"channels": [1, 2]}
    assert RunResult.from_json(data) == result
    detection = DetectionResult(
        "strip", "synthetic", "badnets", 100, 10, "score > 0.5", 12, {"auroc": 0.9}, None, 2.0, {}
    )
    assert DetectionResult.from_json(detection.to_json()) == detection


def test_a_results_json_from_before_the_schema_is_read_alike():
    old = RunResult.from_json(OLD_TRAIN)
    assert old.schema == 0 and old.command == "train"
    assert old.scores == Scores(0.85, 0.01, 0.8) and old.detector_value("tpr") == 0.99
    assert old.details == {"split": {"rounds": 7}} and old.plots == Plots()
    assert old.figures == OLD_TRAIN["figures"] and old.command_line == "bdguard train --defense vab"
    old_detect = {
        "detector": "vab",
        "dataset": "d",
        "attack": "a",
        "samples": 5,
        "poisoned": 1,
        "threshold": "t",
        "flagged": 2,
        "metrics": None,
        "model": None,
        "rounds": [1],
        "seconds": 1.0,
        "environment": {},
    }
    detection = DetectionResult.from_json(old_detect)
    assert detection.schema == 0 and detection.extra == {"rounds": [1]} and detection.metric("auroc") is None


def test_a_newer_schema_or_a_non_number_is_refused_and_a_damaged_part_reads_as_missing():
    with pytest.raises(BdguardError, match="schema 99"):
        RunResult.from_json({**OLD_TRAIN, "schema": SCHEMA + 98})
    with pytest.raises(BdguardError, match="ba is 'high', not a number"):
        RunResult.from_json({**OLD_TRAIN, "ba": "high"})
    with pytest.raises(BdguardError, match="no model's results"):
        RunResult.from_json({"detector": "strip"})
    damaged = RunResult.from_json(
        {
            **OLD_TRAIN,
            "detector": "x",
            "before": [1],
            "figures": [{"file": "../../etc/passwd", "caption": "c"}],
            "plots": {"rounds": "/etc/passwd", "scores": 3, "series": {"a": 1}},
            "vab": [],
            "epochs": "ten",
        }
    )
    assert damaged.detector is None and damaged.before is None and damaged.figures == []
    assert damaged.plots == Plots() and damaged.details == {} and damaged.epochs is None
