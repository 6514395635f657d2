"""Token sampling shared by the offline generator and the service's engine.

Per-request parameters (temperature, top-k, top-p, seed) apply row-wise to a ``[B, vocab]`` logits
batch; each seeded request owns a ``torch.Generator`` so its tokens do not depend on which other
requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass
class SamplingParams:
    """``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    #: None: no log-probabilities; k >= 0: the chosen token's and the k most likely tokens' (at most 20)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator for seeded sampled requests; None means the global RNG."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row [V] (fp32) → temperature-scaled logits with top-k / top-p tails set to -inf."""
    x = logits / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        x = x.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    return x


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """logits [B, V] → next token ids [B] (int64, on logits' device)."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in fp32 (the risk endpoint reads label tokens' values from these)."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of raw logits [B, V] and their sampled tokens [B] → one fp32 tensor [B, 1 + 2k] per row: the
    token's log-probability, the k largest log-probabilities, their token ids (exact in fp32: vocabularies
    are far below 2**24). One tensor, so a single copy brings a step's values to the host.

    Log-probabilities of the model's own distribution (log-softmax of the logits before temperature,
    top-k and top-p), as vLLM reports them by default: they say how likely the model found a token,
    whatever the request's sampling settings."""
    lp = logprobs(logits)
    chosen = lp.gather(-1, tokens.view(-1, 1).to(lp.device))
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return torch.cat([chosen, top.values, top.indices.float()], dim=-1)


def unpack_logprobs(row: Sequence[float], n: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """One row of :func:`token_logprobs` (computed with ``k``) → (the token's log-probability, the ``n <= k``
    most likely ``(token id, log-probability)``, most likely first)."""
    k = min(k, (len(row) - 1) // 2)
    top = [(int(row[1 + k + j]), float(row[1 + j])) for j in range(min(n, k))]
    return float(row[0]), top
