"""Sampling: the logits processors, stop strings and EOS of a generation; the engine
(runtime.SharedRuntime, and runtime.generate over it) runs the decode loop.

Sampling follows transformers' processors, in its order: repetition penalty (over prompt +
generated ids: score < 0 -> score * p, else score / p), then temperature, top_k, top_p
(HF's TopPLogitsWarper: drop the ascending-sorted tokens whose cumulative probability is
<= 1 - top_p, always keeping the most likely one). temperature == 0 is greedy (argmax
after the penalty).

Finish reasons: "eos" (the EOS id is kept in token_ids, as HF), "stop" (a stop string
appeared in the decoded text: token_ids end with the token that completed it and text is
cut before the stop string), "length" (max_new_tokens reached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = ["GenerationResult", "sample", "warp_logits", "apply_repetition_penalty"]


@dataclass
class GenerationResult:
    token_ids: list
    finish_reason: str  # "length" | "stop" | "eos"
    text: Optional[str] = None


SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (as vLLM): dividing by them overflows
_FMAX = torch.finfo(torch.float32).max


def check_sampling(temperature: float, top_k: int, top_p: float,
                   repetition_penalty: float) -> tuple[float, float, float]:
    """(temperature, top_p, repetition_penalty) as floats, or a ValueError naming the bad one;
    a temperature below SAMPLING_EPS becomes 0 (greedy)."""
    def num(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        return float(v)

    temperature, top_p, penalty = num("temperature", temperature), num("top_p", top_p), \
        num("repetition_penalty", repetition_penalty)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    return (0.0 if temperature < SAMPLING_EPS else temperature), top_p, penalty


def apply_repetition_penalty(logits: torch.Tensor, histories: Sequence[Sequence[int]], penalty: float) -> torch.Tensor:
    """In place on logits [B, V] (float), as HF's RepetitionPenaltyLogitsProcessor."""
    if penalty == 1.0:
        return logits
    for i, hist in enumerate(histories):
        if len(hist) == 0:
            continue
        idx = torch.tensor(hist, dtype=torch.long, device=logits.device)
        score = logits[i].gather(0, idx)
        # clamped: an extreme penalty must not turn a logit into inf (inf - inf is NaN in softmax)
        score = torch.where(score < 0, score * penalty, score / penalty).clamp(-_FMAX, _FMAX)
        logits[i].scatter_(0, idx, score)
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] (already penalised) -> token ids int64 [B]."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper (filtered = -inf)."""
    scores = (logits.float() / temperature).clamp(-_FMAX, _FMAX)  # finite, whatever the temperature
    V = scores.shape[-1]
    if top_k and top_k > 0:
        k = min(top_k, V)
        kth = torch.topk(scores, k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


def eos_ids(model, tokenizer, eos_token_id) -> set:
    """The ids that end a sequence. None: the tokenizer's EOS and every id of config.json's
    eos_token_id (an int or a list, as HF generate reads it: a chat model lists both its
    end-of-turn and its end-of-text token); [] disables EOS."""
    if eos_token_id is None:
        ids = set()
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        cfg_eos = model.config.extra.get("eos_token_id")
        ids.update([int(cfg_eos)] if isinstance(cfg_eos, int) else (int(e) for e in cfg_eos or ()))
        return ids
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(int(e) for e in eos_token_id)


def primary_eos(model, tokenizer) -> Optional[int]:
    """The one EOS id appended to texts (the pooled token, training targets): the tokenizer's
    (a chat model's end of turn), else the smallest of config.json's; None when there is none."""
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = eos_ids(model, None, None)
    return min(eos) if eos else None


def stop_strings(stop: Union[None, str, Sequence[str]], tokenizer) -> list:
    """The non-empty stop strings as a list; they need a tokenizer to be found."""
    stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    return stop


def append_token(result: "GenerationResult", token: int, eos: set, stop: list, tokenizer,
                 max_new_tokens: int) -> Optional[str]:
    """Append the sampled token; return the finish reason ("eos", "stop", "length") or None.
    On "stop" result.text is the text cut before the first stop string."""
    result.token_ids.append(token)
    if token in eos:
        return "eos"
    if stop:
        text = tokenizer.decode(result.token_ids)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            result.text = text[: min(hits)]
            return "stop"
    return "length" if len(result.token_ids) >= max_new_tokens else None
