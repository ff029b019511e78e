"""`bdguard report` reads only regular files inside the folders it is given, never writes over a run's files and
turns damaged records into warnings (docs/design.md, "Files and trust")."""

import base64
import json
import os
import signal

import numpy as np
import pytest

from bdguard.plotting import new_figure
from bdguard.reporting.figures import png_bytes
from cli_helpers import assert_one_line_error, run_cli

RESULTS = {"ba": 0.9, "asr": 0.05, "dataset": "synthetic", "model": "small-cnn", "attack": "badnets", "defense": "x"}


def _png(label: str) -> bytes:
    figure = new_figure(1.0, 1.0)
    figure.subplots().set_title(label)
    return png_bytes(figure)


def _run_folder(folder, results=RESULTS):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def no_hang():
    """A report that blocks on a FIFO fails the test instead of hanging the suite."""

    def expired(*_):
        raise TimeoutError("the report blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_links_out_of_the_folder_and_fifos_are_not_read(tmp_path, capsys, no_hang):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png("outside"))
    run = _run_folder(tmp_path / "run")
    (run / "curve.png").symlink_to(secret)  # a link out of the folder: never embedded
    (run / "inside.png").write_bytes(_png("inside"))
    (run / "alias.png").symlink_to(run / "inside.png")  # a link that stays inside: fine
    os.mkfifo(run / "zz.png")
    os.mkfifo(run / "metrics.jsonl")
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", str(run), "--out", str(out))
    assert code == 0, err
    page = out.read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert page.count(base64.b64encode((run / "inside.png").read_bytes()).decode()) == 2
    assert "curve.png is not a regular file" in err and "zz.png" in err


def test_a_results_file_linked_from_outside_is_refused(tmp_path, capsys):
    elsewhere = _run_folder(tmp_path / "elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").symlink_to(elsewhere / "results.json")
    code, _, err = run_cli(capsys, "report", str(run), "--out", str(tmp_path / "r.html"))
    assert_one_line_error(code, err, "is not a regular file of its folder")


@pytest.mark.parametrize("name", ["results.json", "model.safetensors", "report"])
def test_the_report_never_writes_over_a_runs_files(tmp_path, capsys, name):
    run = _run_folder(tmp_path / "run")
    before = (run / "results.json").read_bytes()
    code, _, err = run_cli(capsys, "report", str(run), "--out", str(run / name))
    assert_one_line_error(code, err, "must name an .html file")
    assert (run / "results.json").read_bytes() == before and not (run / "model.safetensors").exists()


def test_damaged_records_cost_their_own_row_or_figure_only(tmp_path, capsys):
    bench = tmp_path / "bench"
    cells = [
        {"attack": "badnets", "defense": "none", "seed": 0, "status": "done", "folder": "cells/a"},
        {"attack": "badnets", "defense": "vab", "seed": 0, "status": "done", "folder": "cells/b"},
        {"attack": "blended", "defense": "none", "seed": 0, "status": "done", "folder": "../outside"},
        {"attack": 3, "defense": "none", "status": "done"},
        "not a row",
    ]
    _run_folder(bench, {"suite": "s", "config": {"attacks": "badnets"}, "cells": cells, "detections": [[]]})
    a = _run_folder(bench / "cells" / "a", {**RESULTS, "environment": "not a table"})
    (a / "cell.json").write_text("{")
    rows = [{"epoch": 1, "ba": 0.5, "asr": 0.9}, {"epoch": 2, "ba": 0.7, "asr": "high"}]
    lines = [json.dumps(row).encode() for row in rows] + [b"{not json", b"\xff\xfe\n", b"[1, 2]"]
    (a / "metrics.jsonl").write_bytes(b"\n".join(lines))
    plots = {"series": {"victim_asr": 3}, "rounds": "detector.jsonl", "scores": "scores.csv"}
    b = _run_folder(bench / "cells" / "b", {**RESULTS, "before": [1], "detector": "x", "plots": plots})
    (b / "cell.json").write_text("[]")
    (b / "detector.jsonl").write_text('{"round": "one"}\n{"round": 1, "tpr": 0.5}\n')
    (b / "scores.csv").write_text("index,label,score,flagged\n0,0,oops,yes\n")
    np.save(b / "poison_mask.npy", np.array([True]))
    _run_folder(tmp_path / "outside")
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", str(bench), "--out", str(out))
    assert code == 0, err
    assert "Traceback" not in err and "3 line(s) that are not JSON objects skipped" in err
    assert "'../outside' is not a folder inside" in err
    page = out.read_text()
    assert page.count('<details id="cell-') == 2  # cells a and b, not the one outside
    assert "training: BA, ASR and RA after every epoch" in page  # the sound rows of metrics.jsonl are drawn
    assert "detector: TPR, FPR, AUROC per scoring round" in page  # the sound round, without the unreadable ROC


def test_a_detect_folder_is_reported(tmp_path, capsys):
    metrics = {"auroc": 0.875, "tpr": 0.96, "fpr": 0.01}
    results = {"detector": "strip", "attack": "badnets", "dataset": "synthetic", "metrics": metrics}
    run = _run_folder(tmp_path / "detect", results)
    (run / "score_hist.png").write_bytes(_png("scores"))
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", str(run), "--out", str(out))
    assert code == 0, err
    page = out.read_text()
    assert "Poisoned-sample detection" in page and "0.875" in page and "TPR 96.0%" in page
    assert base64.b64encode((run / "score_hist.png").read_bytes()).decode() in page


def test_a_new_detecting_defense_gets_its_roc_curve_and_series_without_naming_vab(tmp_path, capsys, monkeypatch):
    """What the report draws comes from what a defense returns (DefenseResult: scores, flags, series), so a defense
    written tomorrow gets its ROC curve and its own per-epoch line with no edit to the report."""
    from bdguard.defenses.base import DefenseResult, TrainingDefense
    from bdguard.defenses.registry import DEFENSES

    class Oracle(TrainingDefense):  # scores every sample by the ground truth: an ROC curve with AUROC 1
        name = "throwaway-oracle"

        def train(self, job):
            model = job.new_model()
            (job.run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "ba": 0.5, "calm": 0.25}) + "\n")
            truth = job.poisoned.poison_mask
            return DefenseResult(model, scores=truth.float(), flagged=truth, series={"calm": "calmness"})

    monkeypatch.setitem(DEFENSES._items, Oracle.name, Oracle)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "synthetic", "--arch", "small-cnn", "--attack", "badnets", "--quiet"]
    code, _, err = run_cli(capsys, *argv, "--defense", Oracle.name, "--out", str(run))
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["plots"] == {"series": {"calm": "calmness"}, "rounds": None, "scores": "scores.csv"}
    rows = (run / "scores.csv").read_text().splitlines()
    truth = np.load(run / "poison_mask.npy")
    assert rows[0] == "index,label,score,flagged" and len(rows) == truth.size + 1
    assert [row.endswith(",yes") for row in rows[1:]] == truth.tolist()
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", str(run), "--out", str(out))
    assert code == 0, err
    page = out.read_text()
    assert "throwaway-oracle&#x27;s detector" in page or "throwaway-oracle's detector" in page
    # the figure is drawn from scores.csv: without it (or its ground truth) there is none
    (run / "scores.csv").unlink()
    code, _, err = run_cli(capsys, "report", str(run), "--out", str(out))
    assert code == 0 and "s detector:" not in out.read_text(), err
