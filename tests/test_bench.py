"""`bdguard bench` and `bdguard report` end to end on the `smoke` suite (synthetic data, small CNNs): the grid's
folders and table, a bench killed part-way and resumed to the same results.csv, and the report rendered by headless
Chromium. The uninterrupted smoke run is made once and shared, on its BadNets half: its Blended half runs the same
steps with another attack (which the benchmark scripts' cells train; the plan tests below read its settings)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bdguard
from bdguard.attacks import AttackConfig, build_attack
from bdguard.attacks.store import load_poisoned, poison_key, store_poisoned
from bdguard.bench import load_suite
from bdguard.bench.grid import plan
from bdguard.bench.results import TIMING, read_csv, summarise_seeds
from bdguard.config import load_file
from bdguard.data import DataConfig, load_dataset
from bdguard.errors import BdguardError
from bdguard.io import read_json
from bdguard.runs.detect import DetectConfig
from bdguard.runs.repair import RepairConfig
from bdguard.runs.train import RunConfig
from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = ["bench", "--suite", "smoke", "--quiet"]
CELLS = [("badnets", defense) for defense in ("none", "vab", "abl", "linf-prune", "fine-pruning", "anp")]


@pytest.fixture(scope="module")
def smoke_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    from bdguard.cli.main import main

    assert main([*SMOKE, "--attacks", "badnets", "--out", str(out)]) == 0
    return out


BADNETS_HALF = load_suite("smoke", {"attacks": ["badnets"]})


def _without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_csv(path)]


def test_smoke_bench_writes_one_row_per_cell_and_reuses_shared_work(smoke_bench):
    rows = read_csv(smoke_bench / "results.csv")
    assert [(r["attack"], r["defense"]) for r in rows] == CELLS
    assert {r["status"] for r in rows} == {"done"} and {r["seed"] for r in rows} == {"0"}
    cell = {(r["attack"], r["defense"]): r for r in rows}
    assert float(cell["badnets", "none"]["asr"]) > 0.9 and float(cell["badnets", "none"]["ba"]) > 0.9
    assert float(cell["badnets", "vab"]["asr"]) < 0.2  # V&B removes the patch backdoor
    vab = cell["badnets", "vab"]
    assert float(vab["tpr"]) > 0.9 and float(vab["auroc"]) > 0.8 and vab["pruned_fraction"] == ""
    for defense in ("linf-prune", "fine-pruning"):
        pruned = cell["badnets", defense]
        assert 0 < float(pruned["pruned_fraction"]) < 1 and pruned["tpr"] == ""
        assert float(pruned["asr_before"]) == pytest.approx(float(cell["badnets", "none"]["asr"]), abs=0.05)
    assert float(cell["badnets", "linf-prune"]["asr"]) < 0.5
    # defenses added after the table was written fill it through their DefenseResult alone
    assert 0.0 <= float(cell["badnets", "abl"]["auroc"]) <= 1.0 and cell["badnets", "abl"]["pruned_fraction"] == ""
    assert 0.0 <= float(cell["badnets", "anp"]["pruned_fraction"]) < 1.0 and cell["badnets", "anp"]["tpr"] == ""

    results = read_json(smoke_bench / "results.json")
    assert results["suite"] == "smoke" and len(results["cells"]) == 6 and len(results["summary"]) == 6
    assert results["summary"][0]["seeds"] == 1 and results["summary"][0]["ba_std"] is None
    assert (smoke_bench / "summary.csv").exists()

    # post-training cells repair the `none` model of their attack; its training cells read one stored poisoned set
    steps = {(s.attack, s.defense): s for s in plan(BADNETS_HALF, smoke_bench) if s.is_cell}
    repaired = read_json(smoke_bench / "cells/badnets/linf-prune/seed0/results.json")
    assert Path(repaired["model_path"]) == smoke_bench / "cells/badnets/none/seed0/model.safetensors"
    assert len(list((smoke_bench / "poisoned-sets").glob("*/manifest.json"))) == 1

    # each cell's run.yaml gives back its settings, and cell.json the commands that redo it from them
    for (attack, defense), step in steps.items():
        assert (step.folder / "cell.json").exists()
        settings = load_file(step.folder / "run.yaml")
        loaded = (RepairConfig if step.kind == "repair" else RunConfig).from_dict(settings)
        assert loaded == step.config, (attack, defense)
        assert read_json(step.folder / "cell.json")["commands"] == step.commands()
    record = read_json(smoke_bench / "cells/badnets/fine-pruning/seed0/cell.json")
    assert record["commands"][0].startswith("bdguard repair --model ") and "analyze" in record["commands"][1]
    assert (smoke_bench / "poison/badnets/gallery.png").read_bytes()[:4] == b"\x89PNG"
    assert (smoke_bench / "cells/badnets/vab/seed0/analysis/gradcam.png").exists()


def test_every_detector_scores_every_poisoned_set_of_the_bench(smoke_bench):
    rows = read_csv(smoke_bench / "detections.csv")
    detectors = ["vab", "abl", "spectral", "activation-clustering", "strip"]
    assert [(r["attack"], r["detector"]) for r in rows] == [("badnets", detector) for detector in detectors]
    assert {r["status"] for r in rows} == {"done"} and {r["poisoned"] for r in rows} == {"200"}
    auroc = {(r["attack"], r["detector"]): float(r["auroc"]) for r in rows}
    assert auroc["badnets", "vab"] > 0.9 and auroc["badnets", "activation-clustering"] > 0.9, auroc
    assert read_json(smoke_bench / "results.json")["detections"] == [
        {key: read_json(smoke_bench / r["folder"] / "cell.json")["row"][key] for key in r} for r in rows
    ]
    steps = {(s.attack, s.defense): s for s in plan(BADNETS_HALF, smoke_bench) if s.kind == "detect"}
    for (attack, detector), step in steps.items():
        assert DetectConfig.from_dict(load_file(step.folder / "run.yaml")) == step.config
        assert read_json(step.folder / "cell.json")["commands"] == step.commands()
        # the model-based detectors inspect the undefended cell's model; the others train their own network
        model = smoke_bench / "cells" / attack / "none/seed0/model.safetensors"
        assert step.source == (model if detector in ("spectral", "activation-clustering", "strip") else None)
        assert read_json(step.folder / "results.json")["model"] == (None if step.source is None else str(model))


# pieces of the smoke grid whose steps are the full grid's, run by the executor and resume tests and compared with
# the serial run's rows (without the galleries and analyses, which the serial run draws): a repair and a model-based
# detection wait for the `none` model; the V&B detector trains its own Victim; the killed bench stops in a V&B cell
# once it has checkpointed
PIECE = {"defenses": ("none", "linf-prune"), "detectors": ("vab", "spectral")}
KILLED_PIECE = {"defenses": ("none", "vab", "linf-prune"), "detectors": ("vab", "spectral")}


def _piece(piece: dict[str, tuple[str, ...]]) -> list[str]:
    names = [f"--{key}={','.join(names)}" for key, names in piece.items()]
    return [*SMOKE, "--attacks", "badnets", *names, "--set", "analyze=false", "--set", "gallery=false"]


def test_a_killed_bench_resumes_to_the_same_results(smoke_bench, tmp_path, capsys):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bdguard.__file__).parents[1]), *sys.path])}
    command = [sys.executable, "-m", "bdguard.cli.main", *_piece(KILLED_PIECE), "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, training = out / "cells/badnets/none/seed0/cell.json", out / "cells/badnets/vab/seed0/checkpoint.pt"
    deadline = time.monotonic() + 300
    try:
        # kill it in the middle of the second cell (V&B), once that has written a checkpoint
        while not (first.exists() and training.exists()):
            assert process.poll() is None, "the bench ended before it could be killed"
            assert time.monotonic() < deadline, "the bench made no progress in 5 minutes"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "cells/badnets/vab/seed0/cell.json").exists()

    code, printed, err = run_cli(capsys, *_piece(KILLED_PIECE), "--out", str(out))
    assert code == 0, err
    assert "steps already finished" in err and "resuming" in err
    _assert_serial_rows(out, smoke_bench, KILLED_PIECE, check_log=False)
    # a cell's seconds are its run's, which count the killed session's work too (test_training checks that sum)
    for row in read_csv(out / "results.csv"):
        assert float(row["seconds"]) == read_json(out / row["folder"] / "results.json")["seconds"], row["folder"]


def _assert_serial_rows(out: Path, serial: Path, piece: dict[str, tuple[str, ...]], check_log: bool = True) -> None:
    """The tables of a piece of the grid run into `out` are the serial grid's rows of those cells."""
    for table, key in (("results.csv", "defense"), ("detections.csv", "detector")):
        expected = [row for row in _without_timing(serial / table) if row[key] in piece[f"{key}s"]]
        assert len(expected) == len(piece[f"{key}s"]) and _without_timing(out / table) == expected, table
    if check_log:  # a step's lines, in its folder
        assert (out / "cells/badnets/none/seed0/log.txt").read_text().count("epoch ") >= 3


def test_ray_with_two_workers_gives_the_serial_tables(smoke_bench, tmp_path, capsys):
    """A piece of the smoke grid as Ray tasks on a 2-CPU local Ray, each repair and model-based detection once its
    `none` model exists: the same rows as the serial run's, seconds aside."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    code, _, err = run_cli(capsys, *_piece(PIECE), "--executor", "ray", "--workers", "2", "--out", str(out))
    assert code == 0, err
    _assert_serial_rows(out, smoke_bench, PIECE)


def test_two_local_workers_give_the_serial_tables(smoke_bench, tmp_path, capsys):
    """A piece of the grid in two local processes: its steps are the serial grid's, so their rows must be too."""
    out = tmp_path / "local"
    code, _, err = run_cli(capsys, *_piece(PIECE), "--executor", "local", "--workers", "2", "--out", str(out))
    assert code == 0, err
    _assert_serial_rows(out, smoke_bench, PIECE)


def test_a_finished_bench_is_skipped_and_other_settings_are_refused(smoke_bench, capsys):
    code, printed, err = run_cli(capsys, *SMOKE, "--attacks", "badnets", "--out", str(smoke_bench))
    assert code == 0 and "12 of 12 steps already finished" in err and "badnets" in printed

    code, _, err = run_cli(capsys, *SMOKE, "--attacks", "badnets", "--set", "train.lr=0.1", "--out", str(smoke_bench))
    assert_one_line_error(code, err, "made with other settings")


def _chromium() -> str | None:
    """A headless Chromium: found on PATH, else installed from Debian's `chromium` package where we are root."""
    names = ("chromium", "chromium-browser", "google-chrome")

    def find() -> str | None:
        return next((shutil.which(name) for name in names if shutil.which(name)), None)

    if find() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900, check=False)
            subprocess.run(install, capture_output=True, timeout=900, check=False)
    return find()


def test_the_report_is_one_self_contained_page_that_renders(smoke_bench, tmp_path, capsys):
    report = tmp_path / "report.html"
    run = smoke_bench / "cells/badnets/linf-prune/seed0"  # a run folder beside the bench: its own matrix
    code, printed, err = run_cli(capsys, "report", str(smoke_bench), str(run), "--out", str(report))
    assert code == 0, err
    page = report.read_text()
    assert 'id="matrix-1"' in page and 'id="matrix-2"' in page and page.count("<details") == 7
    assert "<script" not in page and 'src="http' not in page and 'href="http' not in page  # nothing from a network
    assert page.count('src="data:image/png;base64,') >= 4 * 3 + 1  # per cell: curves and analysis; the gallery
    # each detecting defense's detector figure, from what it returned (V&B's rounds and ROC, ABL's ROC)
    detectors = ("vab&#x27;s detector: TPR", "abl&#x27;s detector: ROC of its final score")
    texts = ("badnets", "fine-pruning", "bdguard repair --model", "torch ", "Trigger galleries", *detectors)
    for text in (*texts, "Poisoned-sample detection", "activation-clustering"):
        assert text in page, text

    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed and could not be installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1280,2000"]
    subprocess.run([*argv, report.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.exists(), "Chromium wrote no screenshot"
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20 and (pixels.mean(axis=2) < 200).mean() > 0.05  # not blank: text, tables, images
    hue_red = (pixels[..., 0] > 200) & (pixels[..., 1] < 190) & (pixels[..., 2] < 190)
    hue_green = (pixels[..., 1] > 200) & (pixels[..., 0] < 210) & (pixels[..., 2] < 190)
    assert hue_red.sum() > 500 and hue_green.sum() > 500  # the colour-coded matrix is drawn


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    cases = [
        (["--suite", "nosuch"], "unknown suite 'nosuch'; known: cifar-cpu, cpu, demo, paper, smoke"),
        (["--suite", "smoke", "--attacks", "badnet"], "unknown attack 'badnet'"),
        (["--suite", "smoke", "--defenses", "vab,pruning"], "unknown defense 'pruning'"),
        (["--suite", "smoke", "--seeds", "two"], "--seeds takes a count"),
        (["--suite", "smoke", "--set", "by_attack.badnets.params.patch=2"], "unknown setting 'badnets.patch'"),
        (["--suite", "smoke", "--set", "by_defense.vab.train.epochs=0"], "train.epochs must be in [1, inf]"),
        (["--suite", "smoke", "--set", "probe.size=500"], "probe.size 500 leaves no test images"),
        (["--suite", str(tmp_path / "missing.toml")], "config file not found"),
        (["--suite", "smoke", "--workers", "2"], "--workers needs --executor local or ray"),
        (["--suite", "smoke", "--executor", "local", "--workers", "0"], "workers must be in [1, inf]"),
        (["--suite", "smoke", "--executor", "local", "--cell-gpus", "1"], "--cell-gpus need --executor ray"),
        (["--suite", "smoke", "--executor", "ray", "--cell-cpus", "0"], "cell_cpus must be in [0.01, inf]"),
        (["--suite", "smoke", "--executor", "local", "--retries", "-1"], "retries must be in [0, inf]"),
        (["--suite", "smoke", "--executor", "cluster"], "invalid choice: 'cluster'"),
        (["--suite", "smoke", "--executor", "ray", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
    ]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "bench", *flags, "--out", str(tmp_path / "out"))
        assert_one_line_error(code, err, message)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html"))
    assert_one_line_error(code, err, "holds no results")
    # a results.json cut short by a kill, or holding other types, is named with what is wrong
    for text, message in (
        ('{"ba": 0.9, "asr"', "is not readable JSON"),
        ('{"ba": "high", "asr": 0.1}', "ba is 'high'"),
    ):
        (tmp_path / "broken").mkdir(exist_ok=True)
        (tmp_path / "broken" / "results.json").write_text(text)
        code, _, err = run_cli(capsys, "report", str(tmp_path / "broken"), "--out", str(tmp_path / "r.html"))
        assert_one_line_error(code, err, message)
        assert str(tmp_path / "broken" / "results.json") in err
    assert not (tmp_path / "r.html").exists()


def test_a_post_training_defense_brings_in_its_undefended_model():
    config = load_suite(
        "smoke", {"defenses": ["fine-pruning"], "seeds": [3, 5], "attacks": ["badnets"], "detectors": []}
    )
    steps = plan(config, "out")
    assert [s.label for s in steps] == [
        "badnets gallery",
        "badnets / none / seed 3",
        "badnets / fine-pruning / seed 3",
        "badnets / none / seed 5",
        "badnets / fine-pruning / seed 5",
    ]
    repair = steps[2]
    assert repair.source == Path("out/cells/badnets/none/seed3/model.safetensors")
    assert repair.config.train.seed == 3 and repair.config.attack.seed == 3 and repair.config.probe.seed == 3
    assert repair.config.defense.params == {"finetune_epochs": 2}
    assert steps[1].config.train.epochs == 3 and steps[1].fingerprint != steps[3].fingerprint


def test_a_variant_of_a_defense_is_a_cell_of_its_own_and_an_unknown_one_is_refused():
    """`[by_defense.NAME] defense = ...` runs a registered defense under another name (the demo's linf-prune with the
    real trigger): planned as that defense (a repair of the `none` model), tabled under its own name."""
    variant = {"defense": "fine-pruning", "params": {"finetune_epochs": 1}}
    overrides = {"defenses": ["fine-pruning", "fp-short"], "attacks": ["badnets"], "detectors": [], "gallery": False}
    config = load_suite("smoke", {**overrides, "by_defense": {"fp-short": variant}})
    steps = plan(config, "out")
    assert [s.label for s in steps] == [
        "badnets / none / seed 0",
        "badnets / fine-pruning / seed 0",
        "badnets / fp-short / seed 0",
    ]
    short = steps[2]
    assert short.kind == "repair" and short.folder == Path("out/cells/badnets/fp-short/seed0")
    assert short.config.defense.name == "fine-pruning" and short.config.defense.params == {"finetune_epochs": 1}
    with pytest.raises(BdguardError, match="fine-prunin"):
        load_suite("smoke", {**overrides, "by_defense": {"fp-short": {"defense": "fine-prunin"}}})


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [
        {"attack": "a", "defense": "d", "status": "done", "ba": 0.5, "asr": 0.1, "tpr": None, "seconds": 1.0},
        {"attack": "a", "defense": "d", "status": "done", "ba": 0.7, "asr": 0.3, "tpr": None, "seconds": 3.0},
        {"attack": "a", "defense": "d", "status": "failed", "ba": None, "asr": None, "tpr": None, "seconds": None},
    ]
    rows = [
        {key: row.get(key) for key in (*row, "ra", "ba_before", "asr_before", "fpr", "auroc", "pruned_fraction")}
        for row in rows
    ]
    (entry,) = summarise_seeds(rows)
    assert entry["seeds"] == 2 and entry["ba_mean"] == pytest.approx(0.6)
    assert entry["ba_std"] == pytest.approx(0.1414, abs=1e-4) and entry["asr_std"] == pytest.approx(0.1414, abs=1e-4)
    assert entry["tpr_mean"] is None and entry["tpr_std"] is None


def test_a_stored_poisoned_set_reads_back_exactly(tmp_path):
    bundle = load_dataset(DataConfig(dataset="synthetic"))
    config = AttackConfig(name="wanet", rate=0.1)  # poisoned and cross samples
    poisoned = build_attack(config, 10, bundle.image_shape).poison(bundle.train)
    key = poison_key(bundle.name, bundle.train, config)
    assert key != poison_key(bundle.name, bundle.train, AttackConfig(name="wanet", rate=0.1, seed=1))
    assert load_poisoned(tmp_path / key, key, bundle.train) is None
    store_poisoned(tmp_path / key, key, poisoned)
    loaded = load_poisoned(tmp_path / key, key, bundle.train)
    assert torch.equal(loaded.train.images, poisoned.train.images)
    assert torch.equal(loaded.train.labels, poisoned.train.labels)
    assert torch.equal(loaded.poison_mask, poisoned.poison_mask) and torch.equal(loaded.cross_mask, poisoned.cross_mask)
    assert loaded.manifest == poisoned.manifest and int(poisoned.cross_mask.sum()) > 0
    (tmp_path / key / "images.npy").write_bytes(b"damaged")
    assert load_poisoned(tmp_path / key, key, bundle.train) is None  # rebuilt, not trusted


def test_a_second_bench_on_a_busy_folder_is_refused(tmp_path, capsys):
    """No step may run twice at once: the folder is held for the whole bench (see io.run_lock)."""
    from bdguard.io import run_lock

    out = tmp_path / "busy"
    out.mkdir()
    with run_lock(out):
        code, _, err = run_cli(capsys, *SMOKE, "--out", str(out))
    assert_one_line_error(code, err, "is being written by another bdguard process")
