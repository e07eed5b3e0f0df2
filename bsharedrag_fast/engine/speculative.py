"""Draft tokens by prompt lookup (n-gram speculation, as vLLM's "ngram" method and llama.cpp's
lookup decoding): a RAG answer often repeats spans of the passages in its prompt, and so does
a model repeating itself. The draft is what followed the latest earlier occurrence of the
sequence's last n tokens (the longest n first); the engine runs the draft as extra rows of
the sequence's decode step and keeps the longest prefix the model's own greedy choices
agree with, plus the model's next token: the output is the greedy output, only computed in
fewer steps.

Why it pays on a CPU: a decode step of a few rows streams every weight once, so its time is
the weights' bytes over the memory bandwidth and each further row adds only its arithmetic.
smollm2-135m, fp32, 2-core EPYC: a step of 1 + k rows of one sequence cost 1.09, 1.13,
1.19, 1.23 x a 1-row step at k = 1..4 (about 7% a row), while the bench's RAG prompts
accepted 0.15-0.5 draft tokens a step; simulated on 17 of them with that cost, n-grams of
2-4 tokens and k = 4 gave 1.06-1.34x the tokens per second (k = 8: worse; 1-token n-grams:
worse at the low end). Where no n-gram of the tail occurred before, nothing is drafted and
the step is the plain 1-row step.
"""
from __future__ import annotations


class PromptLookup:
    """The n-gram index of one sequence's tokens (prompt, then generated): each n-gram of
    min_n..max_n tokens -> the position after its latest occurrence that has a continuation."""

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._next: dict[tuple, int] = {}  # n-gram -> where its latest continuation starts

    def extend(self, tokens) -> None:
        toks, index = self.tokens, self._next
        for t in tokens:
            end = len(toks)  # the n-grams ending here get the continuation t
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index[tuple(toks[end - n: end])] = end
            toks.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching
        tail n-gram; [] when no tail n-gram occurred before."""
        toks = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            at = self._next.get(tuple(toks[len(toks) - n:]))
            if at is not None:
                return toks[at: at + k]
        return []
