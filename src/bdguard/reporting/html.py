"""`bdguard report`: one self-contained HTML file from bench and run folders.

What it reads, per folder given:
- a bench folder (`bdguard bench`: results.json with `cells`): every cell's run folder, the attacks' galleries;
- a run folder (`train`, `prune`, `evaluate`: results.json with `ba`), a poisoning folder (`poison`:
  manifest.json) or an analysis folder (`analyze`: analysis.json).
What it writes: the BA/ASR matrix of each bench (and of the loose runs, per data set and model), colour-coded;
every cell's row; the trigger galleries; per cell its figures (the training curve, V&B's entropy histograms and
detector curves, the pruning curve and norms, Grad-CAM), the commands that made it and the versions. Every image
is embedded as a data URI and the page has no script and no link outside itself, so it opens offline and can be
mailed as one file.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bdguard import __version__
from bdguard.errors import BdguardError
from bdguard.io import write_text
from bdguard.progress import log
from bdguard.reporting.figures import detector_curves, training_curve
from bdguard.reporting.files import folder_inside, pngs, read_bytes, read_json_dict, read_json_file, read_jsonl
from bdguard.results import DetectionResult, RunResult, is_number
from bdguard.stats import mean_std

# the figures of the poisoning gallery and of `analyze`; a defense's come captioned in its results.json (`figures`)
CAPTIONS = {
    "gallery.png": "poisoning gallery: clean and poisoned training images, their amplified difference, triggered test "
    "images",
    "norms.png": "per-channel activation norms, clean vs triggered",
    "norms_clean.png": "per-channel activation norms of the clean-trained model",
    "nc_trigger.png": "Neural Cleanse: the reversed mask and pattern",
    "gradcam.png": "Grad-CAM on clean and triggered probe images (title: mean trigger-focus ratio)",
}


@dataclass
class Entry:
    """One result: a bench cell or a run folder."""

    folder: Path
    attack: str
    defense: str
    seed: int | None
    results: RunResult
    commands: list[str] = field(default_factory=list)
    analysis: Path | None = None  # an analyze folder of this entry's model

    @property
    def anchor(self) -> str:
        return "cell-" + "".join(c if c.isalnum() else "-" for c in str(self.folder))


@dataclass
class Group:
    """A matrix: one bench, or the loose runs of one data set and model."""

    title: str
    description: str
    entries: list[Entry] = field(default_factory=list)
    galleries: dict[str, Path] = field(default_factory=dict)  # attack -> its poison folder
    attacks: list[str] = field(default_factory=list)  # row and column order
    defenses: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # bench cells that failed: "attack / defense / seed k: error"
    detections: list[dict[str, Any]] = field(default_factory=list)  # a bench's detection rows (detections.csv)
    detection_folders: list[Path] = field(default_factory=list)  # detect folders given: their figures are shown


def _commands(result: RunResult) -> list[str]:
    return [result.command_line] if result.command_line else []


def _seed(folder: Path) -> int | None:
    try:
        return int(read_json_dict(folder, folder / "config.json")["config"]["train"]["seed"])
    except (ValueError, KeyError, TypeError):
        return None


def _analysis(folder: Path) -> Path | None:
    """The analyze folder of a run (its `analysis/`), when it holds an analysis."""
    analysis = folder_inside(folder, folder / "analysis")
    return analysis if analysis is not None and read_json_file(analysis, analysis / "analysis.json") else None


CELL_KEYS = ("attack", "defense", "folder")  # what a bench's cell row must name to be reported


def read_results(path: Path) -> dict[str, Any]:
    """A results.json's table (a regular file of its folder), refused with its path when it is truncated or holds
    no table; what it holds is read by bdguard.results."""
    raw = read_bytes(path.parent, path)
    if raw is None:
        raise BdguardError(f"{path} is not a regular file of its folder")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BdguardError(f"{path} is not readable JSON ({exc}); a run killed while writing it? rerun it") from None
    if not isinstance(data, dict):
        raise BdguardError(f"{path} holds no table of results")
    return data


def _names(value: Any) -> list[str]:
    return [str(name) for name in value] if isinstance(value, list) else []


def _named(row: dict[str, Any], keys: Iterable[str]) -> bool:
    return all(isinstance(row.get(key), str) for key in keys)


def _bench_group(folder: Path, data: dict[str, Any]) -> Group:
    config = _part(data, "config")
    group = Group(f"suite {data.get('suite', folder.name)} ({folder})", str(data.get("description") or ""))
    group.attacks, group.defenses = _names(config.get("attacks")), _names(config.get("defenses"))
    for row in data["cells"]:
        if not isinstance(row, dict) or not _named(row, CELL_KEYS):
            log(f"warning: {folder}/results.json: a cell without {', '.join(CELL_KEYS)} left out of the report")
            continue
        if row.get("status") == "failed":
            group.failed.append(f"{row['attack']} / {row['defense']} / seed {row.get('seed')}: {row.get('error')}")
        if row.get("status") != "done":
            continue
        cell = folder_inside(folder, folder / row["folder"])
        if cell is None:
            log(f"warning: cell {row['folder']!r} is not a folder inside {folder}; left out of the report")
            continue
        try:
            results = RunResult.from_json(read_results(cell / "results.json"), str(cell / "results.json"))
        except BdguardError as exc:
            log(f"warning: {exc}; cell left out of the report")
            continue
        commands = read_json_dict(cell, cell / "cell.json").get("commands")
        commands = [str(c) for c in commands] if isinstance(commands, list) else _commands(results)
        seed = row.get("seed") if isinstance(row.get("seed"), int) else None
        group.entries.append(Entry(cell, row["attack"], row["defense"], seed, results, commands, _analysis(cell)))
    poisons = folder_inside(folder, folder / "poison")
    for poison in [] if poisons is None else sorted(poisons.iterdir()):
        if folder_inside(poisons, poison) and read_json_file(poison, poison / "manifest.json") is not None:
            group.galleries[poison.name] = poison
    detections = data.get("detections")
    rows = detections if isinstance(detections, list) else []
    group.detections = [row for row in rows if isinstance(row, dict) and _named(row, ("attack", "detector"))]
    for row in group.detections:
        if row.get("status") == "failed":
            where = f"{row['attack']} / detector {row['detector']} / seed {row.get('seed')}"
            group.failed.append(f"{where}: {row.get('error')}")
    return group


def collect_groups(folders: Iterable[Path]) -> tuple[list[Group], list[Path]]:
    """The matrices of the given folders and the loose analysis folders; a folder with nothing to report is an
    error."""
    groups: list[Group] = []
    loose: dict[tuple[str, str], Group] = {}
    analyses: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise BdguardError(f"{folder} is not a folder")
        results_file = folder / "results.json"
        data = read_results(results_file) if results_file.exists() else None
        if isinstance(data, dict) and isinstance(data.get("cells"), list):
            groups.append(_bench_group(folder, data))
        elif isinstance(data, dict) and "ba" in data:
            result = RunResult.from_json(data, str(results_file))
            key = (result.dataset, result.model)
            group = loose.setdefault(key, Group(f"runs: {key[0]}, {key[1]}", ""))
            entry = Entry(folder, result.attack, result.defense, _seed(folder), result, _commands(result))
            entry.analysis = _analysis(folder)
            group.entries.append(entry)
        elif isinstance(data, dict) and isinstance(data.get("detector"), str):
            detection = DetectionResult.from_json(data, str(results_file))
            group = loose.setdefault(("detect", ""), Group("detections (bdguard detect)", ""))
            row = {key: detection.metric(key) for key in ("auroc", "tpr", "fpr")}
            names = {"attack": detection.attack, "detector": detection.detector, "status": "done"}
            group.detections.append({**row, **names})
            group.detection_folders.append(folder)
        elif (manifest := read_json_file(folder, folder / "manifest.json")) is not None:
            attack = manifest.get("attack", folder.name) if isinstance(manifest, dict) else folder.name
            group = loose.setdefault(("poison", ""), Group("poisoned sets", ""))
            group.galleries[f"{attack} ({folder})"] = folder
        elif read_json_file(folder, folder / "analysis.json") is not None:
            analyses.append(folder)
        else:
            raise BdguardError(
                f"{folder} holds no results: expected a bench folder or a run or detect folder (results.json), a "
                "poisoning folder (manifest.json) or an analysis folder (analysis.json)"
            )
    for group in loose.values():
        group.attacks = list(dict.fromkeys(entry.attack for entry in group.entries))
        group.defenses = list(dict.fromkeys(entry.defense for entry in group.entries))
    groups.extend(loose.values())
    return groups, analyses


# ---------------------------------------------------------------------------------------------------------------
# rendering

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1d2330; background: #ffffff; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 21px; margin-top: 36px; border-bottom: 2px solid #d7dce5; }
h3 { font-size: 16px; margin-top: 24px; } .meta { color: #5a6376; font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; }
th, td { border: 1px solid #c9cfda; padding: 4px 8px; text-align: right; } th { background: #eef1f6; }
td.name, th.name { text-align: left; }
table.matrix td { padding: 0; min-width: 130px; } table.matrix td a { display: block; color: inherit;
  text-decoration: none; } table.matrix .asr { padding: 8px 8px 2px; font-size: 16px; font-weight: 600; }
table.matrix .ba { padding: 2px 8px 6px; font-size: 13px; } table.matrix td.empty { background: #f4f5f7;
  color: #9aa1ad; text-align: center; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 4px; border-radius: 3px; font-size: 12px; }
figure { display: inline-block; margin: 8px 12px 8px 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #d7dce5; }
.galleries figure { width: 31%; min-width: 300px; } figcaption { font-size: 12px; color: #5a6376;
  max-width: 560px; }
details { border: 1px solid #d7dce5; border-radius: 4px; margin: 8px 0; padding: 4px 10px; }
summary { cursor: pointer; font-weight: 600; padding: 4px 0; } pre { background: #f4f5f7; padding: 8px;
  overflow-x: auto; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _part(results: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested table of a results.json; {} when it is missing or of another type (a damaged file)."""
    value = results.get(key)
    return value if isinstance(value, dict) else {}


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if is_number(value) else "–"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, caption: str) -> str:
    text = _esc(caption)
    return f'<figure><img src="{_data_uri(png)}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _pngs(folder: Path, prefix: str = "", declared: Iterable[dict[str, str]] = ()) -> list[str]:
    """The folder's PNGs: the `declared` ones (a defense's `figures`) first, in their order and with their
    captions, then the known ones of CAPTIONS, then any other by its name."""
    captions = {**CAPTIONS, **{f["file"]: f["caption"] for f in declared}}
    order = [f["file"] for f in declared] + list(CAPTIONS)
    files = sorted(pngs(folder), key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    figures = ((path, read_bytes(folder, path)) for path in files)
    return [_figure(png, prefix + captions.get(path.name, path.name)) for path, png in figures if png is not None]


def _with_std(mean: float | None, std: float | None) -> str:
    return _pct(mean) + ("" if std is None else f" ± {100 * std:.1f}")


def _hue_colour(good: float) -> str:
    """A pale background from red (good = 0) through yellow to green (good = 1)."""
    good = min(max(good, 0.0), 1.0)
    return f"hsl({120 * good:.0f}, 70%, 82%)"


BA_DROP_RED = 0.20  # a BA 20 points below the undefended model's is full red


def _matrix(group: Group, index: int) -> str:
    cells: dict[tuple[str, str], list[Entry]] = {}
    for entry in group.entries:
        cells.setdefault((entry.attack, entry.defense), []).append(entry)
    attacks = [a for a in group.attacks if any(k[0] == a for k in cells)] or sorted({k[0] for k in cells})
    defenses = [d for d in group.defenses if any(k[1] == d for k in cells)]
    defenses += sorted({k[1] for k in cells} - set(defenses))
    if "none" in defenses:
        defenses.remove("none")
        defenses.insert(0, "none")
    head = "".join(f"<th>{_esc(d)}</th>" for d in defenses)
    body = []
    for attack in attacks:
        undefended = [e.results.scores.ba for e in cells.get((attack, "none"), []) if e.results.scores.ba is not None]
        reference = mean_std(undefended)[0]
        tds = []
        for defense in defenses:
            members = cells.get((attack, defense))
            if not members:
                tds.append('<td class="empty">–</td>')
                continue
            ba = mean_std([e.results.scores.ba for e in members if e.results.scores.ba is not None])
            asr = mean_std([e.results.scores.asr for e in members if e.results.scores.asr is not None])
            asr_colour = _hue_colour(1 - asr[0]) if asr[0] is not None else "#f4f5f7"
            if ba[0] is None:
                ba_colour = "#f4f5f7"
            elif reference is not None:
                ba_colour = _hue_colour(1 - max(0.0, reference - ba[0]) / BA_DROP_RED)
            else:
                ba_colour = _hue_colour(ba[0])
            seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
            tds.append(
                f'<td><a href="#{members[0].anchor}" title="{_esc(attack)} / {_esc(defense)}{seeds}">'
                f'<div class="asr" style="background:{asr_colour}">ASR {_with_std(*asr)}</div>'
                f'<div class="ba" style="background:{ba_colour}">BA {_with_std(*ba)}</div></a></td>'
            )
        body.append(f'<tr><th class="name">{_esc(attack)}</th>{"".join(tds)}</tr>')

    def swatch(good: float, text: str) -> str:
        return f'<span style="background:{_hue_colour(good)}">{text}</span>'

    legend = (
        f'<p class="legend">ASR: {swatch(1, "0%")}{swatch(0.5, "50%")}{swatch(0, "100%")} &nbsp; BA: '
        f"{swatch(1, 'as undefended')}{swatch(0.5, '10 points lower')}{swatch(0, '20+ points lower')} (mean ± std "
        "over seeds; a post-training defense's BA and ASR are on the test set minus its probe images)</p>"
    )
    return (
        f'<table class="matrix" id="matrix-{index}"><caption>ASR and BA per attack (rows) and defense (columns)'
        f'</caption><tr><th class="name">attack \\ defense</th>{head}</tr>{"".join(body)}</table>{legend}'
    )


ROW_KEYS: tuple[tuple[str, Callable[[RunResult], str]], ...] = (
    ("BA", lambda r: _pct(r.scores.ba)),
    ("ASR", lambda r: _pct(r.scores.asr)),
    ("RA", lambda r: _pct(r.scores.ra)),
    ("BA before", lambda r: _pct(r.before.ba if r.before else None)),
    ("ASR before", lambda r: _pct(r.before.asr if r.before else None)),
    ("TPR", lambda r: _pct(r.detector_value("tpr"))),
    ("FPR", lambda r: _pct(r.detector_value("fpr"))),
    ("AUROC", lambda r: _fmt3(r.detector_value("auroc"))),
    ("pruned", lambda r: _pct(r.pruned_fraction)),
    ("seconds", lambda r: f"{r.seconds:.0f}" if r.seconds is not None else "–"),
)


def _fmt3(value: Any) -> str:
    return f"{value:.3f}" if is_number(value) else "–"


def _rows_table(entries: list[Entry]) -> str:
    head = "".join(f"<th>{name}</th>" for name, _ in ROW_KEYS)
    rows = []
    for e in entries:
        values = "".join(f"<td>{_esc(fmt(e.results))}</td>" for _, fmt in ROW_KEYS)
        seed = "–" if e.seed is None else e.seed
        link = f'<a href="#{e.anchor}">{_esc(e.attack)}</a>'
        rows.append(
            f'<tr><td class="name">{link}</td><td class="name">{_esc(e.defense)}</td><td>{seed}</td>{values}</tr>'
        )
    return (
        f'<table class="cells"><tr><th class="name">attack</th><th class="name">defense</th><th>seed</th>{head}</tr>'
        f"{''.join(rows)}</table>"
    )


def _versions(result: RunResult) -> str:
    env = result.environment
    keys = ("bdguard", "torch", "python", "machine", "cuda")
    return ", ".join(f"{key} {env[key]}" for key in keys if env.get(key))


def _entry_details(entry: Entry) -> str:
    r = entry.results
    parts = [f"BA {_pct(r.scores.ba)}"]
    if r.scores.asr is not None:
        parts.append(f"ASR {_pct(r.scores.asr)}")
    seed = "" if entry.seed is None else f" / seed {entry.seed}"
    summary = f"{_esc(entry.attack)} / {_esc(entry.defense)}{seed}: {' '.join(parts)}"
    body = [_rows_table([entry])]
    figures = []
    rows = read_jsonl(entry.folder, entry.folder / "metrics.jsonl")
    png = training_curve(rows, f"{entry.attack} / {entry.defense}: per epoch", r.plots.series)
    if png:
        figures.append(_figure(png, "training: BA, ASR and RA after every epoch"))
    detector = detector_curves(entry.folder, r.plots.rounds, r.plots.scores)
    if detector:
        parts = ["TPR, FPR, AUROC per scoring round"] if r.plots.rounds else []
        parts += ["ROC of its final score"] if r.plots.scores else []
        caption = f"{entry.defense}'s detector: {'; '.join(parts)}"
        figures.append(_figure(detector, caption))
    figures += _pngs(entry.folder, declared=r.figures)
    if entry.analysis is not None:
        figures += _pngs(entry.analysis, "analysis: ")
    body.append("".join(figures))
    if r.details:  # the defense's own (DefenseResult.details)
        text = json.dumps(r.details, indent=1, default=str)
        body.append(f"<p>defense details</p><pre>{_esc(text)}</pre>")
    commands = "\n".join(entry.commands) or "(not recorded)"
    body.append(f"<p>command</p><pre>{_esc(commands)}</pre>")
    body.append(f'<p class="meta">folder {_esc(entry.folder)}; {_esc(_versions(r))}</p>')
    return f'<details id="{entry.anchor}"><summary>{summary}</summary>{"".join(body)}</details>'


def _detection_table(rows: list[dict[str, Any]]) -> str:
    """Attack x detector: AUROC of the scores, then TPR and FPR at the detector's own threshold (mean over seeds)."""
    done = [row for row in rows if row.get("status") == "done"]
    attacks = list(dict.fromkeys(row["attack"] for row in done))
    detectors = list(dict.fromkeys(row["detector"] for row in done))
    head = "".join(f"<th>{_esc(name)}</th>" for name in detectors)
    body = []
    for attack in attacks:
        cells = []
        for detector in detectors:
            mine = [row for row in done if row["attack"] == attack and row["detector"] == detector]

            def mean(key: str, mine=mine) -> float | None:
                return mean_std([row[key] for row in mine if is_number(row.get(key))])[0]

            auroc = mean("auroc")
            colour = "" if auroc is None else f' style="background:{_hue_colour(max(0.0, 2 * auroc - 1))}"'
            text = f"{_fmt3(auroc)}<br>TPR {_pct(mean('tpr'))} FPR {_pct(mean('fpr'))}" if mine else "-"
            cells.append(f"<td{colour}>{text}</td>")
        body.append(f"<tr><th>{_esc(attack)}</th>{''.join(cells)}</tr>")
    caption = (
        '<h3>Poisoned-sample detection</h3><p class="meta">per attack and detector: AUROC of the scores (colour: '
        "0.5 red, 1.0 green), then TPR and FPR of the detector's own flags; detections.csv holds every figure</p>"
    )
    return f"{caption}<table><tr><th>attack</th>{head}</tr>{''.join(body)}</table>"


def _group_html(group: Group, index: int) -> str:
    parts = [f'<section id="group-{index}"><h2>{_esc(group.title)}</h2>']
    if group.description:
        parts.append(f"<p>{_esc(group.description)}</p>")
    if group.failed:
        parts.append(f'<p class="meta">failed (re-run the bench to retry): {_esc("; ".join(group.failed))}</p>')
    if group.entries:
        parts.append(_matrix(group, index))
        parts.append("<h3>All cells</h3>" + _rows_table(group.entries))
    if any(row.get("status") == "done" for row in group.detections):
        parts.append(_detection_table(group.detections))
    for folder in group.detection_folders:
        parts.append(f"<h3>{_esc(folder)}</h3>" + "".join(_pngs(folder)))
    if group.galleries:
        parts.append('<h3>Trigger galleries</h3><div class="galleries">')
        for attack, folder in group.galleries.items():
            for path in pngs(folder):
                png = read_bytes(folder, path) if path.name.startswith("gallery") else None
                if png is not None:
                    parts.append(_figure(png, f"{attack}: {CAPTIONS['gallery.png']}"))
        parts.append("</div>")
    if group.entries:
        parts.append("<h3>Cells</h3>" + "".join(_entry_details(entry) for entry in group.entries))
    parts.append("</section>")
    return "".join(parts)


def render(groups: list[Group], analyses: list[Path], title: str) -> str:
    import torch

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"bdguard {__version__}, torch {torch.__version__}, python {platform.python_version()}"
    body = [f"<h1>{_esc(title)}</h1>", f'<p class="meta">written {now} by {_esc(versions)}</p>']
    body += [_group_html(group, i) for i, group in enumerate(groups, 1)]
    if analyses:
        body.append('<section id="analyses"><h2>Analyses</h2>')
        for folder in analyses:
            body.append(f"<h3>{_esc(folder)}</h3>" + "".join(_pngs(folder)))
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report(folders: list[Path], out: Path, title: str | None = None) -> Path:
    """Collect `folders` and write the report to `out` (an .html file); returns its path."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise BdguardError(f"--out {out} must name an .html file (the report never replaces a run's own files)")
    if out.is_dir():
        raise BdguardError(f"--out {out} is a folder; name the .html file to write")
    groups, analyses = collect_groups(folders)
    if not analyses and not any(group.entries or group.galleries or group.detections for group in groups):
        names = ", ".join(str(folder) for folder in folders)
        raise BdguardError(f"nothing to report in {names}: no finished cells or runs yet")
    if title is None:
        title = "bdguard report: " + ", ".join(folder.name or str(folder) for folder in folders)
    write_text(out, render(groups, analyses, title))
    return out
