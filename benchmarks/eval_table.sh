#!/usr/bin/env bash
# The evaluation table of docs/EVAL.md: reward methods x human-labelled preference sets, then the
# reward-quality levers, all with the embedded SmolLM2-135M on CPU (greedy unless a lever says
# otherwise). Each run is one `flip-ray evaluate`; summaries land in $OUT/<run>/summary.json and
# benchmarks/eval_collect.py turns them into the tables.
#
#   bash benchmarks/eval_table.sh [DATA_DIR=../shared/data] [OUT=outputs/eval_table] [RUNS="main levers"]
#   (RUNS may also name "expensive": n > 1 and the pairwise/listwise judges, and "variants": the
#   likelihood rewards that discount word overlap, on the human sets and the best-of-N set; and "copy":
#   flip with and without copy-blocking decoding)
#   ONLY="run names" restricts a call to those runs, e.g. ONLY="lever_temperature lever_n4".
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-outputs/eval_table}
RUNS=${3:-"main levers"}
FR=${FR:-.venv/bin/flip-ray}
HUMAN="mtbench_human llmeval2_human pandalm_test faireval_human ifeval_pairs hh_rlhf_harmless_test"
mkdir -p "$OUT/sets/human" "$OUT/sets/all" "$OUT/sets/bon"
for ext in jsonl jsonl.gz; do
  f="$DATA/rewardbench_bon_tulu2_pairs/data.$ext"
  if [ -f "$f" ]; then ln -sf "$(cd "$(dirname "$f")" && pwd)/data.$ext" "$OUT/sets/bon/rewardbench_bon_tulu2_pairs.$ext"; fi
done
for d in $HUMAN alpacaeval2_gpt4turbo_pairs; do
  for ext in jsonl jsonl.gz; do
    if [ -f "$DATA/$d/data.$ext" ]; then
      src=$(cd "$DATA/$d" && pwd)/data.$ext
      ln -sf "$src" "$OUT/sets/all/$d.$ext"
      case " $HUMAN " in *" $d "*) ln -sf "$src" "$OUT/sets/human/$d.$ext" ;; esac
    fi
  done
done

run() {  # run NAME SETS key=value ...
  local name=$1 sets=$2; shift 2
  if [ -n "${ONLY:-}" ]; then case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac; fi
  local t0=$SECONDS
  local status="s wall"
  "$FR" evaluate input.path="$OUT/sets/$sets" output.path="$OUT/$name" output.overwrite=true \
    evaluation.subset_from=file input.sample_seed=0 reward.judge_max_tokens=128 evaluation.judge_max_tokens=128 \
    "$@" >"$OUT/$name.log" 2>&1 || status="s wall, FAILED (see $OUT/$name.log)"
  echo "$name: $((SECONDS - t0)) $status" | tee -a "$OUT/walltimes.txt"
}

case " $RUNS " in *" main "*)
  run main all input.sample_per_file=60 sampling.max_tokens=128 reward.prompt=flip \
    'evaluation.methods=[flip,flip_logprob,judge_pointwise,longer,shorter,prompt_overlap]'
  # The best FLIP variant of the levers on the whole main sample.
  run main_no_reasoning all input.sample_per_file=60 sampling.max_tokens=128 reward.prompt=no_reasoning \
    'evaluation.methods=[flip_logprob,longer,shorter,prompt_overlap]'
;; esac
case " $RUNS " in *" levers "*)
  # 30 pairs per human-labelled set: the same pairs as the first 30 of the main run's 60 per set
  # (the seeded sample is nested), so the levers compare on equal footing with lever_base. The lever
  # runs use the authors' prompt (reward.prompt=flip) unless the lever is the prompt.
  L=(input.sample_per_file=30 sampling.max_tokens=128 reward.prompt=flip)
  run lever_base human "${L[@]}" 'evaluation.methods=[flip,flip_logprob,longer,shorter,prompt_overlap]'
  run lever_guided human "${L[@]}" reward.guided_json=true 'evaluation.methods=[flip,judge_pointwise]'
  run lever_no_reasoning human "${L[@]}" reward.prompt=no_reasoning 'evaluation.methods=[flip,flip_logprob]'
  run lever_few_shot human "${L[@]}" reward.few_shot=3 'evaluation.methods=[flip,flip_logprob]'
  run lever_contrast human "${L[@]}" reward.logprob_distractors=2 'evaluation.methods=[flip_logprob]'
  run lever_temperature human "${L[@]}" sampling.temperature=0.7 'evaluation.methods=[flip]'
;; esac
case " $RUNS " in *" expensive "*)
  # Several generations per item: 15 pairs per set (nested in the 30), compared by eval_collect.py with
  # the 30-per-set runs restricted to the same items.
  S=(input.sample_per_file=15 sampling.max_tokens=128 reward.prompt=flip)
  run lever_n4 human "${S[@]}" sampling.n=4 sampling.temperature=0.7 'evaluation.methods=[flip]'
  run lever_judges human "${S[@]}" 'evaluation.methods=[judge_pairwise,judge_listwise]'
  run lever_judges_guided human "${S[@]}" reward.guided_json=true 'evaluation.methods=[judge_pairwise,judge_listwise]'
;; esac
case " $RUNS " in *" copy "*)
  # Copying and echoing (issue 25): flip at the default prompt with and without copy-blocking
  # decoding, and with worked examples, on the levers' 30 pairs per human-labelled set and 30 pairs of
  # the RewardBench best-of-N set; copy and echo rates are in each summary.json (`flags`).
  C=(input.sample_per_file=30 sampling.max_tokens=128)
  B=(reward.block_copy=4 reward.no_repeat_ngram=4)
  for sets in human bon; do
    run copy_base_$sets $sets "${C[@]}" 'evaluation.methods=[flip,longer,shorter,prompt_overlap]'
    run copy_block_$sets $sets "${C[@]}" "${B[@]}" 'evaluation.methods=[flip]'
    run copy_few_shot_block_$sets $sets "${C[@]}" reward.few_shot=3 "${B[@]}" 'evaluation.methods=[flip]'
    run copy_logprob_$sets $sets "${C[@]}" 'evaluation.methods=[flip_logprob]'
  done
;; esac
case " $RUNS " in *" variants "*)
  # The likelihood rewards of issue 15 beside flip, flip_logprob and the baselines, default prompt
  # (no_reasoning): the same 60 pairs per human-labelled set as the main run, and 60 pairs of the
  # RewardBench best-of-N set. The combinations are rank means of two rewards, no fitted weight.
  V=(input.sample_per_file=60 sampling.max_tokens=128
     'evaluation.methods=[flip,flip_logprob,flip_logprob_lexical,pmi_forward,flip_lexical_rank,flip_pmi_rank,longer,shorter,prompt_overlap]')
  run variants_human human "${V[@]}"
  run variants_bon bon "${V[@]}"
  # flip_logprob_lexical with the other control: only the response's words that the instruction has.
  O=(input.sample_per_file=60 sampling.max_tokens=128 reward.lexical_control=overlap
     'evaluation.methods=[flip,flip_logprob_lexical,flip_lexical_rank,longer,shorter,prompt_overlap]')
  run variants_overlap_human human "${O[@]}"
  run variants_overlap_bon bon "${O[@]}"
;; esac
