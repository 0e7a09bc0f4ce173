"""Copy-blocking decoding (`reward.block_copy: k`): while `flip` generates the inferred instruction,
a token that would make a run of k tokens copied from the response is forbidden.

A small model asked to infer an instruction often writes the response's opening again instead
(`text.copying` measures it). This is a vLLM logits processor through vLLM's own interface for them
(`AdapterLogitsProcessor`, loaded by the engine by name: `specs.BLOCK_COPY_PROCESSOR`), switched
on per request by `SamplingParams.extra_args` (`request_params`), so that the engine's other
requests (likelihoods, judges) are untouched. A request's state is the response's (k-1)-grams
with the tokens that follow each one: one dict lookup per generated token.

The same processor blocks repeats (`reward.no_repeat_ngram: n`, as transformers'
`no_repeat_ngram_size`): a token that would repeat an n-gram of the answer itself is forbidden, so
that a small model cannot loop on the prompt's scaffolding until `max_tokens`.

Imported in the engine actor only (it imports vLLM and torch).
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

# The keys of `SamplingParams.extra_args` that switch it on for one request.
RUN, SOURCE, REPEAT = "flip_ray_block_copy", "flip_ray_copy_source", "flip_ray_no_repeat_ngram"


def next_tokens(source: list[int], k: int) -> dict[tuple[int, ...], list[int]]:
    """For every run of k-1 tokens in `source`, the tokens that follow it there."""
    follows: dict[tuple[int, ...], set[int]] = {}
    for i in range(len(source) - k + 1):
        follows.setdefault(tuple(source[i : i + k - 1]), set()).add(source[i + k - 1])
    return {key: sorted(values) for key, values in follows.items()}


class CopyBlocker:
    """One request's state: forbids the tokens that would complete a k-token run of `source`
    (k = 0: none), and those that would repeat an n-gram of the output so far (n = 0: none)."""

    def __init__(self, source: list[int], k: int, repeat: int = 0):
        self.k, self.n = k, repeat
        self.follows = next_tokens(source, k) if k else {}
        self.seen: dict[tuple[int, ...], set[int]] = {}  # the output's own (n-1)-grams and what followed
        self.indexed = 0  # output positions whose n-gram is in `seen`

    def __call__(self, output_ids: list[int], logits):
        banned: list[int] = []
        if self.k and len(output_ids) >= self.k - 1:
            banned += self.follows.get(tuple(output_ids[len(output_ids) - self.k + 1 :]), ())
        if self.n and len(output_ids) >= self.n - 1:
            n = self.n
            while self.indexed + n <= len(output_ids):
                i = self.indexed
                self.seen.setdefault(tuple(output_ids[i : i + n - 1]), set()).add(output_ids[i + n - 1])
                self.indexed += 1
            banned += self.seen.get(tuple(output_ids[len(output_ids) - n + 1 :]), ())
        if banned:
            logits[banned] = float("-inf")
        return logits


class BlockCopy(AdapterLogitsProcessor):
    """The engine-wide processor; a request without `extra_args[RUN]` has no state and costs nothing."""

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def new_req_logits_processor(self, params):
        extra = params.extra_args or {}
        k, source, repeat = extra.get(RUN) or 0, extra.get(SOURCE) or [], extra.get(REPEAT) or 0
        if len(source) < k:
            k = 0  # a response shorter than a run cannot be copied k tokens at a time
        if not k and not repeat:
            return None
        return CopyBlocker(source, k, repeat)


def request_params(params, k: int, source: list[int], repeat: int = 0):
    """`params` for one request whose generation may not copy k tokens of `source` in a row (k = 0:
    may) nor repeat an n-gram of its own (`repeat` = n; 0: may)."""
    row = params.clone()
    row.extra_args = {**(params.extra_args or {}), RUN: k, SOURCE: list(source) if k else [], REPEAT: repeat}
    return row
