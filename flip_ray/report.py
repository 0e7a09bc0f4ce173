"""Run report: an HTML page with PNG plots of a scored output, streamed batch by batch.

    flip-ray report outputs/sample_scored      # writes outputs/sample_scored/report/index.html

Plots: score histogram, score vs response length, parse-status and error rates, mean score per
`model` (when the output has that column), and flag rates. Memory stays constant in the number of
rows: histograms and counters accumulate, and the scatter plot uses a fixed-size reservoir sample.
"""

from __future__ import annotations

import html
import io
import random

import fsspec
import pyarrow.dataset as pads

from flip_ray.schema import FLAG_NAMES
from flip_ray.store import NotAScoredOutput, ScoredOutput, open_scored

_BINS = 40
_RESERVOIR = 4000


class ReportStats:
    """Accumulates what the plots need, one batch at a time."""

    def __init__(self, seed: int = 0):
        self.rows = self.errors = 0
        self.hist = [0] * _BINS
        self.status: dict[str, int] = {}
        self.models: dict[str, list[float]] = {}  # model -> [sum, count]
        self.flags = dict.fromkeys(FLAG_NAMES, 0)
        self.sample: list[tuple[int, float]] = []
        self.seen_scored = 0
        self.rng = random.Random(seed)

    def add(self, batch: dict) -> None:
        n = len(batch["flip_score"])
        self.rows += n
        models = batch.get("model") or [None] * n
        for i in range(n):
            score, error = batch["flip_score"][i], batch["error"][i]
            if error is not None:
                self.errors += 1
            status = batch["parse_status"][i] or ("error" if error is not None else "none")
            self.status[status] = self.status.get(status, 0) + 1
            for flag in FLAG_NAMES:
                if batch.get(flag) and batch[flag][i]:
                    self.flags[flag] += 1
            if score is None:
                continue
            self.hist[min(int(score * _BINS), _BINS - 1)] += 1
            if models[i] is not None:
                acc = self.models.setdefault(str(models[i]), [0.0, 0])
                acc[0] += score
                acc[1] += 1
            words = batch["response_words"][i] if batch.get("response_words") else None
            if words is not None:
                self.seen_scored += 1
                if len(self.sample) < _RESERVOIR:
                    self.sample.append((words, score))
                else:
                    j = self.rng.randrange(self.seen_scored)
                    if j < _RESERVOIR:
                        self.sample[j] = (words, score)


def collect(scored: ScoredOutput) -> ReportStats:
    dataset = pads.dataset(scored.paths, filesystem=scored.fs, format="parquet")
    wanted = ["flip_score", "error", "parse_status", "response_words", "model", *FLAG_NAMES]
    columns = [c for c in wanted if c in dataset.schema.names]
    stats = ReportStats()
    for b in dataset.to_batches(columns=columns):
        stats.add(b.to_pydict())
    return stats


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def render_plots(stats: ReportStats) -> dict[str, bytes]:
    """PNG bytes by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = [i / _BINS for i in range(_BINS)]
    ax.bar(edges, stats.hist, width=1 / _BINS, align="edge", color="#4c72b0", edgecolor="white")
    ax.set(xlabel="flip_score (F1 of inferred vs real instruction)", ylabel="rows", title="Score distribution")
    out["score_hist.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if stats.sample:
        xs, ys = zip(*stats.sample, strict=True)
        ax.scatter(xs, ys, s=8, alpha=0.5, color="#dd8452")
        ax.set_xscale("symlog")
    ax.set(xlabel="response length (words)", ylabel="flip_score", title="Score vs response length")
    out["score_vs_length.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = sorted(stats.status)
    total = max(stats.rows, 1)
    ax.barh(names, [stats.status[k] / total for k in names], color="#55a868")
    flag_names = list(stats.flags)
    ax.barh(flag_names, [stats.flags[k] / total for k in flag_names], color="#c44e52")
    ax.set(xlabel="share of rows", title="Parse status, errors and flags")
    out["status_rates.png"] = _png(fig)
    plt.close(fig)

    if stats.models:
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(stats.models))))
        ranked = sorted(stats.models.items(), key=lambda kv: kv[1][0] / kv[1][1])
        ax.barh([m for m, _ in ranked], [s / n for _, (s, n) in ranked], color="#8172b3")
        ax.set(xlabel="mean flip_score", title="Mean score per model")
        out["score_per_model.png"] = _png(fig)
        plt.close(fig)
    return out


def _html(stats: ReportStats, manifest: dict | None, images: list[str]) -> str:
    c = (manifest or {}).get("counts", {})
    rows = [
        ("rows", stats.rows),
        ("rows with errors", stats.errors),
        ("mean flip_score", f"{c['mean_flip_score']:.4f}" if c.get("mean_flip_score") is not None else "n/a"),
        ("truncated", c.get("truncated", "n/a")),
        ("engine calls saved by dedup", c.get("dedup_saved", "n/a")),
        *((f, n) for f, n in stats.flags.items()),
    ]
    if manifest:
        rows += [
            ("model", manifest["model"]["path"]),
            ("prompt template", manifest["prompt_template_version"]),
            ("rows/s (last run)", manifest["timings"]["rows_per_s"]),
            ("complete", manifest["complete"]),
        ]
    table = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    imgs = "\n".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>flip_ray run report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}th{{text-align:left;padding-right:2em}}
figure{{display:inline-block;margin:1em}}img{{max-width:28em}}</style></head>
<body><h1>flip_ray run report</h1>
<table>{table}</table>
{imgs}
</body></html>
"""


def build_report(output_uri: str, allow_incomplete: bool = False) -> str:
    """Writes `<output>/report/index.html` and its PNGs from the committed rows; returns the page's URI.

    Raises:
        NotAScoredOutput: Not a scoring output, an unfinished one (unless `allow_incomplete`), or no rows.
    """
    scored = open_scored(output_uri, allow_incomplete=allow_incomplete, key="report: output")
    if not scored.paths:
        raise NotAScoredOutput(f"report: {output_uri} holds no scored rows")
    stats = collect(scored)
    fs, root = fsspec.core.url_to_fs(scored.uri)
    plots = render_plots(stats)
    fs.makedirs(f"{root}/report", exist_ok=True)
    for name, png in plots.items():
        fs.pipe_file(f"{root}/report/{name}", png)
    fs.pipe_file(f"{root}/report/index.html", _html(stats, scored.manifest, list(plots)).encode())
    return f"{scored.uri}/report/index.html"
