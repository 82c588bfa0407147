"""Per-request sampling and text streaming: the parts of decoding that belong to one request, not the batch.

    SamplingParams   max_tokens, temperature (0 = greedy), top_p, seed, stop strings
    Sampler          picks the next token from one row's logits with the request's own torch.Generator,
                     so a seeded request samples the same tokens whatever else is in the batch
    TextStream       turns token ids into text deltas: holds back an incomplete UTF-8 character and any tail
                     that may still become a stop string; cuts the text at the first stop string
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request decodes."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Sampler:
    """Chooses tokens for one request: argmax at temperature 0, else temperature + nucleus (top_p) sampling."""

    def __init__(self, params: SamplingParams) -> None:
        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = None
        if self.temperature > 0:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2 ** 63)
            self.generator = torch.Generator().manual_seed(int(seed) % 2 ** 64)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def __call__(self, logits: torch.Tensor) -> int:
        """Returns the next token id for one row's logits (vocab,)."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each one
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


class TextStream:
    """Accumulates token ids and yields the text that is final: `push(token) -> (delta, stopped)`."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Adds one token; returns (new final text, whether a stop string ended the text)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(final=False)

    def finish(self) -> str:
        """Returns whatever text was held back (the request ended without a stop string)."""
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self.text
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.emitted - len(s) + 1))) != -1]
        if hits:
            self.text = text[:min(hits)]
            return self._take(len(self.text)), True
        end = len(text)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":  # an unfinished multi-byte character
                end -= 1
            hold = max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
            end -= hold
        return self._take(max(end, self.emitted)), False

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta
