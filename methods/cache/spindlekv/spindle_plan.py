"""SpindleKV's per-layer token budgets: the paper's pyramid of token counts, each stored
head's keep order, and the search that spends the codebook's savings on more kept tokens
until the compressed layers hold the requested share of the full cache's bytes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from methods.cache.budget import allocate


def spindle_budgets(target: int, seq_len: int, window: int, layers: int, beta: float) -> list[int]:
    """Tokens kept per layer (window included), shallowest first, averaging ``target``.

    The paper's pyramid: ``l_c = l - l_w``, ``r_c = (target - l_w) / l_c``, ``alpha =
    (1 + beta) / 2``; if ``beta < r_c <= alpha`` the ratio runs linearly from ``2 r_c -
    beta`` (layer 0) to ``beta`` (last layer), if ``r_c > alpha`` from 1 to ``2 r_c - 1``
    (the printed ``1 - 2 r_c`` is a typo: the mean must be r_c). Below beta the paper gives
    no pyramid [open]: every layer keeps r_c. Layer λ keeps ``r_c(λ) * l_c`` tokens plus the
    window, floored, the remainders spread so the layers' total is exactly ``m * target``.
    """
    window = min(window, target)
    prefix = seq_len - window
    if prefix <= 0:
        return [seq_len] * layers
    r_c = (target - window) / prefix
    if r_c > (1 + beta) / 2:
        first, last = 1.0, 2 * r_c - 1
    elif r_c > beta:
        first, last = 2 * r_c - beta, beta
    else:
        first = last = r_c
    span = max(layers - 1, 1)
    shares = [(first + (last - first) * rank / span) * prefix for rank in range(layers)]
    return [n + window for n in allocate(shares, (target - window) * layers, prefix)]


def keep_order(scores: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Token indices (B, H, S) per stored head, in the order they are kept: the first
    ``sinks`` tokens, then the last ``window`` newest first, then the rest by score, highest
    first (ties: lower index first). Keeping the first n of it is ``top_indices`` with the
    budget n: sinks, ``min(window, n - sinks)`` recent tokens, the best of the rest."""
    seq_len = scores.shape[-1]
    sinks = min(sinks, seq_len)
    recent = min(window, seq_len - sinks)
    index = torch.arange(seq_len, device=scores.device)
    key = scores.float().clone()
    key[..., :sinks] = -index[:sinks].float()  # lower index first within the sinks
    key[..., seq_len - recent :] = index[seq_len - recent :].float()  # newest first
    order = key.argsort(dim=-1, descending=True, stable=True)
    tier = torch.zeros(seq_len, dtype=torch.long, device=scores.device)
    tier[seq_len - recent :] = 1
    tier[:sinks] = 2
    return order.gather(-1, tier[order].argsort(dim=-1, descending=True, stable=True))


def search_target(
    evaluate: Callable[[int], int],
    budget: float,
    start: int,
    low: int,
    high: int,
    tolerance: float,
    max_evaluations: int = 12,
) -> tuple[int, dict[int, int]]:
    """The largest mean token budget T in [low, high] whose bytes ``evaluate(T)`` stay
    within ``budget``, found to within ``tolerance`` bytes of it: starting at ``start`` (the
    paper's token count), then a secant through the two nearest evaluations (a proportional
    step after the first), kept inside the bracket. Returns (T, every evaluation); T is
    ``low`` when nothing fits.

    Bytes grow with T (every layer's pyramid budget grows with it; the greedy codebook may
    wobble by an entry, which the bracket absorbs)."""
    seen: dict[int, int] = {}
    fit: int | None = None  # the largest T known to fit
    over: int | None = None  # the smallest T known not to
    aim = budget - tolerance / 2
    t = min(max(start, low), high)
    for _ in range(max_evaluations):
        seen[t] = evaluate(t)
        if seen[t] <= budget:
            fit = t if fit is None else max(fit, t)
        else:
            over = t if over is None else min(over, t)
        if fit is not None and (budget - seen[fit] <= tolerance or fit == high):
            break
        if (fit is None and over == low) or (None not in (fit, over) and over - fit <= 1):
            break
        lowest = fit + 1 if fit is not None else low
        highest = over - 1 if over is not None else high
        nearest = sorted(seen, key=lambda x: abs(seen[x] - aim))[:2]
        if len(nearest) == 2 and seen[nearest[0]] != seen[nearest[1]]:
            a, b = nearest
            guess = a + (aim - seen[a]) * (b - a) / (seen[b] - seen[a])
        else:
            guess = t * aim / max(seen[t], 1)
        t = min(max(round(guess), lowest), highest)
    return (fit if fit is not None else low), seen
