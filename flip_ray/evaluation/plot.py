"""The evaluation at a glance: one PNG with each method's accuracy and its 95% CI, overall and per
subset, the length rules (`longer`, `shorter`) and chance drawn as lines to beat."""

from __future__ import annotations

import io

RULES = {"longer": ("#c44e52", "longer wins"), "shorter": ("#8172b3", "shorter wins")}


def plot_summary(summary: dict[str, dict], title: str) -> bytes:
    """PNG bytes: a panel for all items and one per subset, a bar per method (length rules as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m not in RULES]
    subsets = sorted({s for entry in summary.values() for s in entry.get("per_subset", {})})
    panels = [("all items", {m: summary[m] for m in summary})]
    panels += [
        (s, {m: e["per_subset"][s] for m, e in summary.items() if s in e.get("per_subset", {})}) for s in subsets
    ]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.2 + 1.1 * len(methods) * len(panels), 4.2), sharey=True, squeeze=False
    )
    for ax, (name, entries) in zip(axes[0], panels, strict=True):
        shown = [m for m in methods if m in entries and entries[m].get("accuracy") is not None]
        acc = [100 * entries[m]["accuracy"] for m in shown]
        low = [100 * (entries[m]["accuracy"] - entries[m].get("ci_low", entries[m]["accuracy"])) for m in shown]
        high = [100 * (entries[m].get("ci_high", entries[m]["accuracy"]) - entries[m]["accuracy"]) for m in shown]
        ax.bar(range(len(shown)), acc, yerr=[low, high], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(shown)), shown, rotation=40, ha="right")
        for rule, (color, label) in RULES.items():
            if rule in entries and entries[rule].get("accuracy") is not None:
                ax.axhline(100 * entries[rule]["accuracy"], color=color, linestyle="--", linewidth=1.2, label=label)
        ax.axhline(50, color="grey", linestyle=":", linewidth=1, label="chance (pairs)")
        n = max((entries[m].get("n", 0) for m in shown), default=0)
        ax.set_title(f"{name} (n={n})", fontsize=9)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("accuracy % (95% CI)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
