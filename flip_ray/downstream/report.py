"""Run report: one self-contained HTML page (images inlined) about a scored output, streamed batch by
batch, so that it can be copied off a cluster or out of s3:// and opened anywhere.

    flip-ray report outputs/sample_scored      # writes outputs/sample_scored/report/index.html

For every reward column the run computed (each reward's `RewardMethod.report_columns`, e.g.
`flip_score` and `flip_logprob_mean`): its distribution, the score against response
length with the correlations printed (a length bias shows), the mean per `model` when that column
exists, and the 5 highest- and 5 lowest-scored rows with the real instruction, a reward's explanation
(`flip`'s inferred instruction) and the start of the response. Then the status (each reward's status
column), error, per-method error and flag rates, and for each reward's own flags (`flip`: the
inferred instruction copies the response, or echoes the prompt's scaffolding) their rate among the
rows it scored and the first examples. Memory stays constant in the number of rows: counters, a
fixed-size reservoir sample per reward, and a few examples each.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import math
import random

import fsspec
import pyarrow.dataset as pads

from flip_ray import rewards
from flip_ray.downstream.selection import as_messages, ranks
from flip_ray.engine.embedded import PURPOSE as EMBEDDED_PURPOSE
from flip_ray.job.store import NotAScoredOutput, ScoredOutput, open_scored
from flip_ray.schema import FLAG_NAMES, output_column_name

_RESERVOIR = 4000
_EXAMPLES = 5
_TEXT = 400  # characters of a text shown in an example


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    return pearson(ranks(xs), ranks(ys))


class RewardStats:
    """One reward: count, sums, a reservoir of (response words, score), per-model means, examples."""

    def __init__(self, rng: random.Random):
        self.n, self.total = 0, 0.0
        self.sample: list[tuple[int, float]] = []
        self.models: dict[str, list[float]] = {}  # model -> [sum, count]
        self.top: list[tuple] = []  # min-heap of (score, id, example) for the highest
        self.bottom: list[tuple] = []  # min-heap of (-score, id, example) for the lowest
        self.rng = rng

    def add(self, score: float, words: int | None, model: str | None, rid: str, example) -> None:
        self.n += 1
        self.total += score
        if words is not None:
            if len(self.sample) < _RESERVOIR:
                self.sample.append((words, score))
            elif (j := self.rng.randrange(self.n)) < _RESERVOIR:
                self.sample[j] = (words, score)
        if model is not None:
            acc = self.models.setdefault(model, [0.0, 0])
            acc[0] += score
            acc[1] += 1
        for heap, key in ((self.top, score), (self.bottom, -score)):
            item = (key, rid, example)
            if len(heap) < _EXAMPLES:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)


class ReportStats:
    """Accumulates what the page needs, one batch at a time."""

    def __init__(self, columns: dict[str, str | None], present: list[str], seed: int = 0):
        self.columns = columns  # prompt / response / messages column names in the output, if kept
        self.rows = self.errors = 0
        self.status: dict[str, int] = {}
        ran = [m for m in rewards.every() if m.error_column in present]  # the rewards that ran
        self.method_errors = {m.name: 0 for m in ran}
        self.error_columns = {m.name: m.error_column for m in ran}
        self.status_columns = {m.name: m.status_column for m in ran if m.status_column in present}
        self.example_column = next((m.example_column for m in ran if m.example_column in present), None)
        # a reward's own flags: flag -> (reward, rows it scored are counted in its RewardStats)
        self.reward_flags = {f: m.name for m in ran for f in m.flags if f in present}
        self.flags = dict.fromkeys([*FLAG_NAMES, *self.reward_flags], 0)
        self.flag_examples: dict[str, list[tuple]] = {f: [] for f in self.reward_flags}
        rng = random.Random(seed)
        self.labels = {c: label for m in ran for c, label in m.report_columns().items() if c in present}
        self.rewards = {name: RewardStats(rng) for name in self.labels}

    def _texts(self, batch: dict, i: int) -> tuple[str | None, str | None]:
        c = self.columns
        if c.get("messages") and batch.get(c["messages"]):
            turns = as_messages(batch[c["messages"]][i]) or []
            return (turns[-2]["content"] if len(turns) > 1 else None), (turns[-1]["content"] if turns else None)
        prompt = batch[c["prompt"]][i] if c.get("prompt") in batch else None
        response = batch[c["response"]][i] if c.get("response") in batch else None
        return prompt, response

    def add(self, batch: dict) -> None:
        n = len(batch["id"])
        self.rows += n
        models = batch.get("model") or [None] * n
        for i in range(n):
            error = batch["error"][i]
            self.errors += error is not None
            for method, column in self.status_columns.items():
                status = f"{method}: {batch[column][i] or ('error' if error is not None else 'none')}"
                self.status[status] = self.status.get(status, 0) + 1
            for method in self.method_errors:
                if batch[self.error_columns[method]][i] is not None:
                    self.method_errors[method] += 1
            for flag in self.flags:
                if batch.get(flag) and batch[flag][i]:
                    self.flags[flag] += 1
                    examples = self.flag_examples.get(flag)
                    if examples is not None and len(examples) < _EXAMPLES:
                        prompt, response = self._texts(batch, i)
                        explained = batch[self.example_column][i] if self.example_column else None
                        examples.append((str(batch["id"][i]), _cut(prompt), _cut(explained), _cut(response)))
            for name, stats in self.rewards.items():
                score = batch[name][i] if batch.get(name) else None
                if score is None or not math.isfinite(score):
                    continue
                prompt, response = self._texts(batch, i)
                explained = batch[self.example_column][i] if self.example_column else None
                example = (_cut(prompt), _cut(explained), _cut(response))
                words = batch["response_words"][i] if batch.get("response_words") else None
                stats.add(score, words, None if models[i] is None else str(models[i]), str(batch["id"][i]), example)


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= _TEXT else text[:_TEXT] + "…"


def collect(scored: ScoredOutput) -> ReportStats:
    dataset = pads.dataset(scored.paths, filesystem=scored.fs, format="parquet")
    inp = (scored.config or {}).get("input", {})
    columns = {
        "prompt": output_column_name(inp.get("prompt_column") or "prompt"),
        "response": output_column_name(inp.get("response_column") or "response"),
        "messages": output_column_name(inp["messages_column"]) if inp.get("messages_column") else None,
    }
    present = dataset.schema.names
    stats = ReportStats(columns, present)
    wanted = [
        "id",
        "error",
        "response_words",
        "model",
        *(stats.status_columns.values()),
        *([stats.example_column] if stats.example_column else []),
        *stats.rewards,
        *stats.flags,
        *stats.error_columns.values(),
        *(c for c in columns.values() if c),
    ]
    for b in dataset.to_batches(columns=[c for c in dict.fromkeys(wanted) if c in dataset.schema.names]):
        stats.add(b.to_pydict())
    return stats


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def render_plots(stats: ReportStats) -> dict[str, str]:
    """Base64 PNGs by name: per reward a histogram and a score-vs-length plot, per-model means, rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for name, r in stats.rewards.items():
        if not r.n:
            continue
        scores = [s for _, s in r.sample]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
        left.hist(scores, bins=40, color="#4c72b0", edgecolor="white")
        left.set(xlabel=name, ylabel="rows (sample)" if r.n > _RESERVOIR else "rows", title=f"{name}: distribution")
        right.scatter([w for w, _ in r.sample], scores, s=8, alpha=0.5, color="#dd8452")
        right.set_xscale("symlog")
        right.set(xlabel="response length (words)", ylabel=name, title=f"{name} vs response length")
        out[f"{name}.png"] = _png(fig)
        plt.close(fig)
        if r.models:
            ranked = sorted(r.models.items(), key=lambda kv: kv[1][0] / kv[1][1])
            fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(ranked))))
            ax.barh([m for m, _ in ranked], [s / n for _, (s, n) in ranked], color="#8172b3")
            ax.set(xlabel=f"mean {name}", title=f"Mean {name} per model")
            out[f"{name}_per_model.png"] = _png(fig)
            plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    total = max(stats.rows, 1)
    labels = sorted(stats.status) + [f"{m} error" for m in stats.method_errors] + list(stats.flags)
    values = (
        [stats.status[k] / total for k in sorted(stats.status)]
        + [v / total for v in stats.method_errors.values()]
        + [v / total for v in stats.flags.values()]
    )
    colors = ["#55a868"] * len(stats.status) + ["#937860"] * len(stats.method_errors) + ["#c44e52"] * len(stats.flags)
    ax.barh(labels, values, color=colors)
    ax.set(xlabel="share of rows", title="Status, errors and flags")
    out["rates.png"] = _png(fig)
    plt.close(fig)
    return out


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _examples(r: RewardStats, name: str, explained: str | None) -> str:
    rows = []
    for title, heap, sign in (("highest", r.top, 1), ("lowest", r.bottom, -1)):
        for key, rid, (prompt, inferred, response) in sorted(heap, reverse=True):
            cells = [title, f"{sign * key:.4f}", rid, prompt or "(not kept)", inferred or "", response or "(not kept)"]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    explanation = (explained or "").replace("_", " ")
    head = "".join(f"<th>{h}</th>" for h in ("", name, "id", "real instruction", explanation, "response"))
    return f'<table class="ex"><tr>{head}</tr>{"".join(rows)}</table>'


def _section(name: str, label: str, r: RewardStats, images: dict[str, str], explained: str | None) -> str:
    xs, ys = [w for w, _ in r.sample], [s for _, s in r.sample]
    corr = f"Pearson {_fmt(pearson(xs, ys))}, Spearman {_fmt(spearman(xs, ys))}"
    parts = [
        f"<h2>{html.escape(name)}</h2><p>{html.escape(label)}: {r.n} rows, mean {r.total / r.n:.4f}. "
        f"Correlation with response length (words): {corr}.</p>",
        f'<img alt="{name}" src="data:image/png;base64,{images[name + ".png"]}">',
    ]
    if r.models:
        table = "".join(
            f"<tr><td>{html.escape(m)}</td><td>{n}</td><td>{s / n:.4f}</td></tr>"
            for m, (s, n) in sorted(r.models.items(), key=lambda kv: -kv[1][0] / kv[1][1])
        )
        parts.append(f"<table><tr><th>model</th><th>rows</th><th>mean {name}</th></tr>{table}</table>")
        parts.append(f'<img alt="{name} per model" src="data:image/png;base64,{images[name + "_per_model.png"]}">')
    parts.append(f"<h3>Examples: the {_EXAMPLES} highest and lowest</h3>" + _examples(r, name, explained))
    return "\n".join(parts)


def _flag_section(stats: ReportStats) -> str:
    """Each reward's own flags: how many of the rows it scored, and the first examples."""
    if not stats.reward_flags:
        return ""
    parts = ["<h2>Answers flagged</h2>"]
    explanation = (stats.example_column or "").replace("_", " ")
    for flag, method in stats.reward_flags.items():
        scored = next((r.n for c, r in stats.rewards.items() if c in _columns_of(method)), 0)
        share = f"{stats.flags[flag] / scored:.0%}" if scored else "n/a"
        parts.append(
            f"<h3>{html.escape(flag)}</h3><p>{stats.flags[flag]} of the {scored} rows {html.escape(method)} scored "
            f"({share}).</p>"
        )
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c or '(not kept)')}</td>" for c in example) + "</tr>"
            for example in stats.flag_examples[flag]
        )
        if rows:
            head = "".join(f"<th>{h}</th>" for h in ("id", "real instruction", explanation, "response"))
            parts.append(f'<table class="ex"><tr>{head}</tr>{rows}</table>')
    return "\n".join(parts)


def _columns_of(method: str) -> set[str]:
    return {f.name for f in rewards.get(method).fields}


def render_html(stats: ReportStats, manifest: dict | None, images: dict[str, str]) -> str:
    """The whole page, images inlined."""
    c = (manifest or {}).get("counts", {})
    facts = [
        ("rows", stats.rows),
        ("rows with errors (no reward at all)", stats.errors),
        *((f"rows {m} could not score", n) for m, n in stats.method_errors.items() if n),
        ("truncated", c.get("truncated", "n/a")),
        ("engine calls saved by dedup", c.get("dedup_saved", "n/a")),
        *stats.flags.items(),
    ]
    if manifest:
        facts += [
            ("model", manifest["model"]["path"]),
            ("prompt template", manifest["prompt_template_version"]),
            ("rows/s (last run)", manifest["timings"]["rows_per_s"]),
            ("complete", manifest["complete"]),
        ]
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts)
    if ((manifest or {}).get("model") or {}).get("embedded_default"):
        table += f'<tr><td colspan="2"><em>{html.escape(EMBEDDED_PURPOSE)}</em></td></tr>'
    sections = [
        _section(name, stats.labels[name], r, images, stats.example_column) for name, r in stats.rewards.items() if r.n
    ]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>flip_ray run report</title>
<style>body{{font-family:sans-serif;max-width:72em;margin:2em auto;color:#222}}th{{text-align:left;padding-right:1.5em}}
td,th{{vertical-align:top;padding:.2em .5em}}img{{max-width:100%}}table.ex td{{font-size:.85em;max-width:24em}}
table.ex tr:nth-child(even){{background:#f4f4f4}}</style></head>
<body><h1>flip_ray run report</h1>
<table>{table}</table>
{"".join(sections) or "<p>No reward was computed for any row.</p>"}
{_flag_section(stats)}
<h2>Status, errors and flags</h2>
<img alt="rates" src="data:image/png;base64,{images["rates.png"]}">
</body></html>
"""


def build_report(output_uri: str, allow_incomplete: bool = False) -> str:
    """Writes `<output>/report/index.html` from the committed rows; returns the page's URI.

    Raises:
        NotAScoredOutput: Not a scoring output, an unfinished one (unless `allow_incomplete`), or no rows.
    """
    scored = open_scored(output_uri, allow_incomplete=allow_incomplete, key="report: output")
    if not scored.paths:
        raise NotAScoredOutput(f"report: {output_uri} holds no scored rows")
    stats = collect(scored)
    page = render_html(stats, scored.manifest, render_plots(stats))
    fs, root = fsspec.core.url_to_fs(scored.uri)
    fs.makedirs(f"{root}/report", exist_ok=True)
    for old in fs.glob(f"{root}/report/*.png"):  # images of an earlier version, now inlined
        fs.rm(old)
    fs.pipe_file(f"{root}/report/index.html", page.encode())
    return f"{scored.uri}/report/index.html"
