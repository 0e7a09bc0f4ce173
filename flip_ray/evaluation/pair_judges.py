"""The per-pair judges of the evaluation job: the authors' pairwise prompt on chosen against each
rejected response in both orders (to cancel position bias), and the listwise prompt over a seeded
shuffle of all candidates. Requests run on Ray Data through the same engine as the scoring job."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import pyarrow as pa
from omegaconf import DictConfig

from flip_ray.engine.embedded import prepare_default_model
from flip_ray.engine.generation import EngineWatchdog, exit_for_restart
from flip_ray.engine.judge import Judge
from flip_ray.engine.queue import is_fatal_engine_error
from flip_ray.engine.specs import EngineSpec, PromptSpec
from flip_ray.engine.verdicts import parse_listwise, parse_pairwise
from flip_ray.evaluation.pairs_input import Item
from flip_ray.evaluation.stats import outcome_from_pick, pair_outcome
from flip_ray.job.runtime import engine_actor_options, init_ray, resolve_device


class PairJudgeStage:
    """Engine actor for the per-pair judges: one `vllm.LLM`, the authors' pairwise/listwise prompts."""

    def __init__(self, *, engine: EngineSpec, prompt: PromptSpec, max_tokens: int):
        if engine.model is None:
            engine = replace(engine, model=str(prepare_default_model()))
        llm = engine.build()
        if engine.multiprocessing:
            EngineWatchdog(llm)
        self.judge = Judge(llm, prompt, max_tokens=max_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._judge(batch)
        except Exception as e:
            if is_fatal_engine_error(e):
                exit_for_restart(f"{type(e).__name__}: {e}")
            raise

    def _judge(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        instr = [r["instruction"] for r in rows]
        ctx = [json.loads(r["context"]) or None for r in rows]
        cands = [json.loads(r["candidates"]) for r in rows]
        picks, statuses, errors = [None] * len(rows), [None] * len(rows), [None] * len(rows)
        pair_rows = [k for k, r in enumerate(rows) if r["kind"] == "pairwise"]
        list_rows = [k for k, r in enumerate(rows) if r["kind"] == "listwise"]
        if pair_rows:
            gens = self.judge.pairwise(
                [instr[k] for k in pair_rows], [tuple(cands[k]) for k in pair_rows], [ctx[k] for k in pair_rows]
            )
            for k, g in zip(pair_rows, gens, strict=True):
                if g.error:
                    errors[k] = g.error
                    continue
                choice, statuses[k] = parse_pairwise(g.texts[0] if g.texts else "")
                picks[k] = None if choice is None else "AB".index(choice)
        if list_rows:
            gens = self.judge.listwise(
                [instr[k] for k in list_rows], [cands[k] for k in list_rows], [ctx[k] for k in list_rows]
            )
            for k, g in zip(list_rows, gens, strict=True):
                if g.error:
                    errors[k] = g.error
                    continue
                picks[k], statuses[k] = parse_listwise(g.texts[0] if g.texts else "", len(cands[k]))
        return pa.table(
            {
                "job": batch.column("job"),
                "pick": pa.array(picks, pa.int64()),
                "status": pa.array(statuses, pa.string()),
                "error": pa.array(errors, pa.string()),
            }
        )


def listwise_order(item: Item, seed: int) -> list[int]:
    """Seeded shuffle of an item's candidates for the listwise judge (chosen is not always first)."""
    order = list(range(len(item.candidates)))
    random.Random(f"{seed}:{item.id}").shuffle(order)
    return order


def pair_judge_jobs(items: list[Item], methods: list[str], seed: int) -> list[dict]:
    """Engine requests of the per-pair judges: pairwise chosen-vs-each-rejected in both orders,
    listwise over a shuffled list."""
    jobs = []
    for n, item in enumerate(items):
        base = {"instruction": item.instruction, "context": json.dumps(item.context)}
        if "judge_pairwise" in methods:
            for r in range(1, len(item.candidates)):
                for order in ((0, r), (r, 0)):
                    jobs.append(
                        {
                            **base,
                            "job": f"p:{n}:{order[0]}:{order[1]}",
                            "kind": "pairwise",
                            "candidates": json.dumps([item.candidates[k] for k in order]),
                        }
                    )
        if "judge_listwise" in methods:
            order = listwise_order(item, seed)
            jobs.append(
                {
                    **base,
                    "job": f"l:{n}",
                    "kind": "listwise",
                    "candidates": json.dumps([item.candidates[k] for k in order]),
                }
            )
    return jobs


def run_pair_judges(cfg: DictConfig, items: list[Item], methods: list[str]) -> tuple[dict[str, dict], float]:
    """Runs the per-pair judges on Ray Data; returns (job id -> result, wall seconds)."""
    jobs = pair_judge_jobs(items, methods, cfg.evaluation.seed)
    if not jobs:
        return {}, 0.0
    ray = init_ray(cfg.ray)
    device = resolve_device(cfg.model.device, ray.cluster_resources().get("GPU", 0))
    engine = EngineSpec.from_config(cfg.model, device=device, seed=cfg.sampling.seed)
    t0 = time.time()
    ds = ray.data.from_items(jobs).map_batches(
        PairJudgeStage,
        fn_constructor_kwargs=dict(
            engine=engine,
            prompt=PromptSpec.from_config(cfg.model, cfg.reward),
            max_tokens=cfg.evaluation.judge_max_tokens,
        ),
        **engine_actor_options(engine, cfg.resources),
    )
    results = {row["job"]: row for row in ds.take_all()}
    return results, time.time() - t0


def judge_outcomes(
    method: str, items: list[Item], results: dict[str, dict], seed: int
) -> tuple[list[float | None], list[int | None], dict[str, int]]:
    """Outcome and pick per item of one per-pair judge, and the parse statuses of its verdicts."""
    pairs = [
        pairwise_outcome(n, it, results) if method == "judge_pairwise" else listwise_outcome(n, it, results, seed)
        for n, it in enumerate(items)
    ]
    statuses: dict[str, int] = {}
    for job, res in results.items():
        if job.startswith("p:" if method == "judge_pairwise" else "l:") and res["status"]:
            statuses[res["status"]] = statuses.get(res["status"], 0) + 1
    return [o for o, _ in pairs], [p for _, p in pairs], statuses


def pairwise_outcome(item_index: int, item: Item, results: dict[str, dict]) -> tuple[float | None, int | None]:
    """Outcome and pick of the pairwise judge: chosen against each rejected in both orders; a
    comparison is won by the response preferred in more orders (a split is a tie)."""
    per_rejected = []
    for r in range(1, len(item.candidates)):
        votes = {0: 0, r: 0}
        for order in ((0, r), (r, 0)):
            res = results.get(f"p:{item_index}:{order[0]}:{order[1]}")
            if res is None or res["error"] is not None:
                return None, None
            if res["pick"] is not None:
                votes[order[res["pick"]]] += 1
        per_rejected.append(pair_outcome(float(votes[0]), [float(votes[r])]))
    outcome = min(per_rejected)
    pick = 0 if outcome == 1.0 else (None if outcome > 0 else next(k + 1 for k, o in enumerate(per_rejected) if o == 0))
    return outcome, pick


def listwise_outcome(
    item_index: int, item: Item, results: dict[str, dict], seed: int
) -> tuple[float | None, int | None]:
    res = results.get(f"l:{item_index}")
    if res is None or res["error"] is not None:
        return None, None
    order = listwise_order(item, seed)
    pick = None if res["pick"] is None else order[res["pick"]]
    return outcome_from_pick(pick, len(item.candidates)), pick
