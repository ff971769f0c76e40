"""``collect report SAMPLE_ID``: what a person files for one sample, from the stored frame results.

The counts are recomputed from the frames the collector stored, not copied from the device's running
tally, and the device's own tally is shown beside them: when the two differ, results are missing (the
sequence gaps inside the sample say which). The blast fraction comes with its 95% Wilson interval,
unclassified cells (quality gate) are listed by reason and never counted, and the research-use
disclaimer is part of every report. Where people reviewed the sample's cells on a device's local page,
their labels are counted beside the model's calls: how often a person agreed with the model is the
one measure of it on this lab's own slides.
"""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from dataclasses import dataclass, field

from collector.store import Gap, Store
from edge import DISCLAIMER, in_words
from edge.errors import UserError
from edge.results import light_problem, wilson_interval


@dataclass
class DeviceProvenance:
    device_id: str
    run_ids: list[str]
    first_sequence: int
    last_sequence: int
    um_per_px: float | None
    bundle: str | None
    device_tally: dict | None


@dataclass
class SampleReport:
    sample_id: str
    frames: list[dict]
    devices: list[DeviceProvenance]
    gaps: list[Gap]
    cells: int = 0
    blasts: int = 0
    unclassified: Counter = field(default_factory=Counter)
    out_of_focus_frames: int = 0
    #: Frames that could show no cells, by why (the result's ``light.problem``: dark, overexposed, no_colour).
    frame_problems: Counter = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)
    reviews: list[dict] = field(default_factory=list)  #: the latest label of each reviewed crop (payloads)

    @property
    def blast_fraction(self) -> float | None:
        return self.blasts / self.cells if self.cells else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.blasts, self.cells) if self.cells else None


def build_report(store: Store, sample_id: str) -> SampleReport:
    frames = store.frames_of(sample_id)
    summaries = {s["device_id"]: s for s in store.summaries_of(sample_id)}
    if not frames and not summaries:
        raise UserError(f"no results stored for sample {sample_id!r}; check the id (samples are named by cmd/start_sample)")
    devices = []
    gaps: list[Gap] = []
    for device_id in sorted({f["device_id"] for f in frames} | set(summaries)):
        own = [f for f in frames if f["device_id"] == device_id]
        sequences = [f["sequence"] for f in own]
        stats = store.latest_stats(device_id) or {}
        low, high = (min(sequences), max(sequences)) if sequences else (0, 0)
        devices.append(DeviceProvenance(
            device_id, sorted({f["run_id"] for f in own}), low, high, (stats.get("scale") or {}).get("um_per_px"),
            # The bundles that scored this sample's frames (schema 3); the device's active one for older results.
            ", ".join(sorted({f["bundle"] for f in own if f.get("bundle")})) or stats.get("bundle"), summaries.get(device_id)))
        # Numbers missing between this sample's first and last frame are frames of this sample (or of one
        # started and stopped in between): the report says so rather than counting without them silently.
        gaps += [g for g in store.gaps(device_id) if low < g.first and g.last < high]
    report = SampleReport(sample_id, frames, devices, gaps, reviews=store.review_labels_of(sample_id))
    for frame in frames:
        report.cells += frame["counts"]["cells"]
        report.blasts += frame["counts"]["blasts"]
        report.unclassified.update(cell["reason"] for cell in frame["unclassified"])
        report.out_of_focus_frames += bool(frame["out_of_focus"])
        if problem := light_problem(frame):
            report.frame_problems[problem] += 1
        report.scores += [cell["p_all"] for cell in frame["cells"]]
    return report


def _fraction(report: SampleReport) -> str:
    if report.blast_fraction is None:
        return "no classified cells"
    low, high = report.interval
    return f"{report.blast_fraction:.1%} (95% CI {low:.1%} to {high:.1%}, Wilson)"


def summary_rows(report: SampleReport) -> list[tuple[str, str]]:
    """The report's facts as (field, value): the CSV's head and the HTML's table."""
    rows = [("sample_id", report.sample_id), ("frames stored", str(len(report.frames))),
            ("classified cells", str(report.cells)), (f"{in_words('all')}s", str(report.blasts)),
            ("blast fraction", _fraction(report)), ("unclassified cells", str(sum(report.unclassified.values())))]
    rows += [(f"unclassified: {reason}", str(count)) for reason, count in sorted(report.unclassified.items())]
    rows += [("out-of-focus frames", str(report.out_of_focus_frames)),
             ("frames that could show no cells", str(sum(report.frame_problems.values())))]
    rows += [(f"frames that could show no cells: {problem.replace('_', ' ')}", str(count))
             for problem, count in sorted(report.frame_problems.items())]
    for d in report.devices:
        tally = d.device_tally
        rows += [(f"device {d.device_id}: runs", ", ".join(d.run_ids) or "none stored"),
                 (f"device {d.device_id}: sequences", f"{d.first_sequence}..{d.last_sequence}"),
                 (f"device {d.device_id}: scale", f"{d.um_per_px} µm/px" if d.um_per_px else "not published"),
                 (f"device {d.device_id}: model bundle", d.bundle or "not published by the device"),
                 (f"device {d.device_id}: its own tally",
                  "none received" if tally is None else
                  f"{tally['frames']} frames, {tally['cells']} cells, {tally['blasts']} blasts ({'final' if tally['final'] else 'running'})")]
    rows += review_rows(report.reviews)
    rows += [("missing results", "; ".join(f"{g.device_id} #{g.first}..{g.last} ({g.missing})" for g in report.gaps) or "none"),
             ("disclaimer", DISCLAIMER)]
    return rows


#: A reviewer's label that says the model's call was right: "blast" for a cell the model flagged, "normal" for
#: one it did not. "not_a_cell" and "unsure" neither confirm nor contradict the call and are left out of agreement.
AGREES = {"flagged": "blast", "random": "normal"}
REVIEW_LABELS = ("blast", "normal", "not_a_cell", "unsure")


def review_rows(reviews: list[dict]) -> list[tuple[str, str]]:
    """Review labels of the sample's cells: how many of each, and how often the reviewer agreed with the model."""
    if not reviews:
        return [("review labels", "none received")]
    counts = Counter(r["label"] for r in reviews)
    rows = [("review labels", f"{len(reviews)} cells reviewed")]
    rows += [(f"review labels: {label}", str(counts[label])) for label in REVIEW_LABELS if counts[label]]
    judged = [r for r in reviews if r["label"] in ("blast", "normal")]
    agreed = sum(AGREES[r["cell"]["selected"]] == r["label"] for r in judged)
    rows.append(("review agreement with the model", f"{agreed} of {len(judged)} ({agreed / len(judged):.0%})" if judged
                 else "no cell labelled blast or normal"))
    for selected, said in (("flagged", "flagged as blast by the model"), ("random", "not flagged (random sample)")):
        group = [r for r in judged if r["cell"]["selected"] == selected]
        if group:
            confirmed = sum(r["label"] == AGREES[selected] for r in group)
            rows.append((f"review: {said}", f"reviewer agreed on {confirmed} of {len(group)}"))
    return rows


FRAME_COLUMNS = ("device_id", "run_id", "sequence", "time", "source", "cells", "blasts", "unclassified", "focus", "out_of_focus",
                 "light_problem")


def _frame_row(frame: dict) -> list:
    return [frame["device_id"], frame["run_id"], frame["sequence"], frame["time"], frame["source"], frame["counts"]["cells"],
            frame["counts"]["blasts"], frame["counts"]["unclassified"], frame["focus"], frame["out_of_focus"], light_problem(frame) or ""]


def to_csv(report: SampleReport) -> str:
    """Two tables in one file: the summary (field, value), a blank line, then one row per frame."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(("field", "value"))
    writer.writerows(summary_rows(report))
    writer.writerow(())
    writer.writerow(FRAME_COLUMNS)
    writer.writerows(_frame_row(f) for f in report.frames)
    return out.getvalue()


def score_histogram_svg(scores: list[float]) -> str | None:
    """The cells' p_all as an inline SVG histogram; None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 3))
    axes.hist(scores, bins=20, range=(0, 1), color="#7a3e9d")
    axes.set_xlabel("p(ALL blast) per classified cell")
    axes.set_ylabel("cells")
    figure.tight_layout()
    out = io.StringIO()
    figure.savefig(out, format="svg")
    plt.close(figure)
    text = out.getvalue()
    return text[text.index("<svg"):]


def to_html(report: SampleReport) -> str:
    e = html.escape
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_rows(report))
    frames = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in _frame_row(f)) + "</tr>" for f in report.frames)
    svg = score_histogram_svg(report.scores) if report.scores else None
    plot = (f"<h2>Score histogram</h2>{svg}" if svg else
            "<p>Score histogram omitted: " + ("no classified cells." if not report.scores else
                                              "matplotlib is not installed (pip install matplotlib).") + "</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>leukoscope sample {e(report.sample_id)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em}th{text-align:left;padding-right:1em}"
            "td,th{border-bottom:1px solid #ddd}.disclaimer{font-weight:bold}</style></head><body>"
            f"<h1>Sample {e(report.sample_id)}</h1><p class='disclaimer'>{e(DISCLAIMER)}</p>"
            f"<table>{table}</table>{plot}<h2>Frames</h2><table><tr>"
            + "".join(f"<th>{c}</th>" for c in FRAME_COLUMNS) + f"</tr>{frames}</table></body></html>\n")
