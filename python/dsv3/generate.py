"""Generation (semantics §3) and MTP speculative decoding (semantics §2.5) over the C++ cached forward.

Plain decoding: one prefill of the prompt, then one single-token cached forward per new token.

Speculative decoding (``speculative="mtp"``), for one sequence. State after each step: the
committed tokens t_0..t_n, the main cache holding rows 0..n-1 (t_n is not yet fed), the MTP
cache holding rows 0..n-1 (row i was fed (h_i, t_{i+1}), h_i = main hidden after model.norm),
and q, the MTP module's distribution for t_{n+1} from row n-1. One step:
  1. draft d_1 ~ q; for num_draft_tokens > 1 re-apply module 1 on its own output hidden state
     and d_j at MTP row n+j-2 to draft d_{j+1} (as engines do with one MTP module);
  2. verify: ONE main forward of [t_n, d_1 .. d_D] at start_pos n gives p_0..p_D;
  3. accept d_j while it passes (greedy: d_j == argmax p_{j-1}; sampling: u < p(d_j)/q(d_j));
     at the first rejection emit argmax p_{j-1} / a sample of norm(max(0, p_{j-1} - q_j));
     if all pass emit a bonus token from p_D;
  4. roll back: truncate the main cache to the accepted rows, run the MTP module over the new
     rows (h_i, t_{i+1}) from start_pos n (rewriting any draft rows) for the next q.
Greedy output is token-for-token the plain greedy output; sampling follows the standard
speculative-sampling acceptance, so the output distribution is the model's (temperature,
top-k and top-p applied to both p and q).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from .ops import CACHE_DTYPES

PromptLike = Union[Sequence[int], np.ndarray]


@dataclass
class GenerationOutput:
    """``tokens``: the new tokens only (int64, 1-D; a list of them for a batch of prompts),
    ending at EOS when it was produced. ``stats``: proposed, accepted, acceptance_rate,
    tokens_per_second (decode), prompt_tokens_per_second, main_forwards, mtp_forwards,
    prompt_tokens, new_tokens, decode_seconds, prompt_seconds. The prompt phase is the
    prefill (plus the MTP module's prefill when speculative) and the first token's sampling;
    decode time excludes time spent by a streaming consumer or callback."""
    tokens: Any
    stats: Dict[str, float] = field(default_factory=dict)
    per_prompt: Optional[List[Dict[str, float]]] = None



# ---------------------------------------------------------------------- sampling
def check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float, np.floating)) or not 0 <= temperature < np.inf:
        raise ValueError(f"[generate] temperature must be finite and >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"[generate] top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float, np.floating)) or not 0 < top_p <= 1:
        raise ValueError(f"[generate] top_p must be in (0, 1], got {top_p!r}")


def probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The sampling distribution (float64, sums to 1) of one logit row (V,): softmax(l / T),
    restricted to the top_k largest logits (0 = all), then to the smallest set of most likely
    tokens whose mass reaches top_p (ties broken by token id), renormalised. temperature 0 is
    the one-hot argmax (lowest id among ties)."""
    l = np.asarray(logits, dtype=np.float64)
    V = l.shape[-1]
    if temperature == 0:
        p = np.zeros(V)
        p[int(np.argmax(l))] = 1.0
        return p
    z = l / float(temperature)
    keep = np.ones(V, bool)
    if 0 < top_k < V:
        order = np.argsort(-z, kind="stable")
        keep[:] = False
        keep[order[:top_k]] = True
    z = np.where(keep, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        n = int(np.searchsorted(csum, top_p * (1 - 1e-12))) + 1  # smallest prefix reaching top_p
        mask = np.zeros(V, bool)
        mask[order[:n]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def draw(p: np.ndarray, rng: np.random.Generator, greedy: bool) -> int:
    if greedy:
        return int(np.argmax(p))
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"),
                   len(p) - 1))


# ---------------------------------------------------------------------- one sequence
class _Decoder:
    """Decodes one prompt; ``run()`` yields the new tokens step by step and fills ``stats``."""

    def __init__(self, model, prompt: np.ndarray, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, seed: int, speculative: Optional[str],
                 eos_token_id: Optional[int], num_draft_tokens: int,
                 cache_dtype: str = "float32"):
        self.m, self.core, self.cfg = model, model._m, model.config
        self.cache_dtype = cache_dtype
        self.prompt = prompt
        self.max_new = max_new_tokens
        self.T, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.greedy = self.T == 0
        self.rng = np.random.default_rng(seed)
        self.spec = speculative == "mtp"
        self.eos = eos_token_id
        self.D = num_draft_tokens if self.spec else 0
        self.stats = dict(prompt_tokens=len(prompt), new_tokens=0, proposed=0, accepted=0,
                          main_forwards=0, mtp_forwards=0, prompt_seconds=0.0,
                          decode_seconds=0.0)

    def _p(self, logits_row):
        if not np.all(np.isfinite(logits_row)):  # NaN/Inf weights: argmax would be token 0 forever
            raise ValueError("[generate] the model produced non-finite logits (NaN or Inf in its "
                             "weights or activations); refusing to generate from them")
        return probs(logits_row, self.T, self.top_k, self.top_p)

    def run(self) -> Iterator[List[int]]:
        P = len(self.prompt)
        limit = min(self.max_new, self.cfg.max_position_embeddings - P)
        cap = P + limit + self.D + 1
        self.cache = cache = self.m.new_cache(1, cap, self.cache_dtype)  # kept for inspection
        t0 = time.perf_counter()
        logits, hidden = self.core.forward_cached(self.prompt[None], cache, 0, True)
        self.stats["main_forwards"] += 1
        nxt = draw(self._p(logits[0, -1]), self.rng, self.greedy)
        q = mtp_cache = None
        if self.spec:
            self.mtp_cache = mtp_cache = self.m.new_mtp_cache(1, cap, self.cache_dtype)
            toks = np.append(self.prompt[1:], nxt)[None]
            ql, qh = self.core.mtp_forward_cached(hidden, toks, mtp_cache, 0, 1)
            self.stats["mtp_forwards"] += 1
            q, qhid = ql[0, -1], qh[0, -1]
        self.stats["prompt_seconds"] = time.perf_counter() - t0
        n, produced = P, 0  # n = index of the committed-but-unfed token nxt
        while limit > 0:  # decode time excludes the consumer's time between yields
            t0 = time.perf_counter()
            if not self.spec or limit - produced < 2 or self._is_eos(nxt):
                new = [nxt]
                if produced + 1 < limit and not self._is_eos(nxt):
                    logits = self.core.forward_cached(np.array([[nxt]], np.int64), cache, n,
                                                      False)
                    self.stats["main_forwards"] += 1
                    nxt = draw(self._p(logits[0, -1]), self.rng, self.greedy)
                    n += 1
            else:
                new, nxt, q, qhid, n = self._spec_step(nxt, n, q, qhid, cache, mtp_cache,
                                                       limit - produced)
            new, done = self._clip(new, limit - produced)
            produced += len(new)
            self.stats["new_tokens"] = produced
            self.stats["decode_seconds"] += time.perf_counter() - t0
            yield new
            if done or produced >= limit:
                break

    def _is_eos(self, t) -> bool:
        return self.eos is not None and t == self.eos

    def _clip(self, new, room):
        new = list(new)[:room]
        for i, t in enumerate(new):
            if self._is_eos(t):
                return new[:i + 1], True
        return new, False

    def _spec_step(self, cur, n, q, qhid, cache, mtp_cache, room):
        """One draft-verify step from committed token ``cur`` at position n. Returns (tokens
        emitted this step, next committed token, q for the token after it, its MTP hidden, n')."""
        D = min(self.D, room - 1)  # never draft past what can be emitted
        drafts, qs = [], []
        for j in range(D):
            qp = self._p(q)
            d = draw(qp, self.rng, self.greedy)
            drafts.append(d)
            qs.append(qp)
            if j + 1 < D:  # re-apply module 1 on its own output at MTP row n + j
                ql, qh = self.core.mtp_forward_cached(qhid[None, None], np.array([[d]], np.int64),
                                                      mtp_cache, n + j, 1)
                self.stats["mtp_forwards"] += 1
                q, qhid = ql[0, -1], qh[0, -1]
        logits, hidden = self.core.forward_cached(np.array([[cur] + drafts], np.int64), cache, n,
                                                  True)
        self.stats["main_forwards"] += 1
        self.stats["proposed"] += D
        emitted, a = [], 0
        for j in range(D):
            p = self._p(logits[0, j])
            d = drafts[j]
            if self.greedy:
                ok = d == int(np.argmax(p))
            else:
                ok = self.rng.random() * qs[j][d] < p[d]  # u < p/q, q[d] > 0 as d ~ q
            if not ok:
                if self.greedy:
                    x = int(np.argmax(p))
                else:
                    r = np.maximum(p - qs[j], 0.0)
                    x = draw(r / r.sum() if r.sum() > 0 else p, self.rng, False)
                break
            emitted.append(d)
            a += 1
            if self._is_eos(d):
                x = None
                break
        else:
            x = draw(self._p(logits[0, D]), self.rng, self.greedy)
        self.stats["accepted"] += a
        # committed now: cur, d_1..d_a (fed, rows n..n+a), then x (unfed) at position n+a+1
        cache.truncate(n + a + 1)
        out = [cur] + emitted
        if x is None:  # EOS accepted: the caller stops; leave a consistent state anyway
            return out, emitted[-1], q, qhid, n + a
        toks = np.array([emitted + [x]], np.int64)
        ql, qh = self.core.mtp_forward_cached(hidden[:, :a + 1], toks, mtp_cache, n, 1)
        self.stats["mtp_forwards"] += 1
        mtp_cache.truncate(n + a + 1)
        return out, x, ql[0, -1], qh[0, -1], n + a + 1


# ---------------------------------------------------------------------- public entry points
def _prompts(model, prompt):
    V = model.config.vocab_size
    if isinstance(prompt, np.ndarray) and prompt.ndim == 2:  # equal-length prompts, one a row
        prompt = list(prompt)
    single = not isinstance(prompt, (list, tuple)) or (len(prompt) > 0 and np.isscalar(prompt[0]))
    items = [prompt] if single else list(prompt)
    if not items:
        raise ValueError("[generate] the list of prompts is empty")
    out = []
    for i, p in enumerate(items):
        a = np.asarray(p)
        name = "prompt" if single else f"prompt[{i}]"
        if a.ndim != 1:
            raise ValueError(f"[generate] {name} must be a 1-D sequence of token ids, got shape "
                             f"{a.shape}")
        if a.size == 0:
            raise ValueError(f"[generate] {name} is empty (give at least one token, e.g. BOS)")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"[generate] {name} must hold integer token ids, got {a.dtype}")
        if a.min() < 0 or a.max() >= V:
            raise IndexError(f"[generate] {name} holds token id {int(a.min() if a.min() < 0 else a.max())}"
                             f" outside [0, vocab_size={V})")
        if a.size >= model.config.max_position_embeddings:
            raise ValueError(f"[generate] {name} has {a.size} tokens; it must be shorter than "
                             f"max_position_embeddings = {model.config.max_position_embeddings}")
        out.append(a.astype(np.int64))
    return out, single


def _decoders(model, prompt, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
              speculative=None, eos_token_id=None, num_draft_tokens=1, cache_dtype="float32"):
    check_sampling(temperature, top_k, top_p)
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"[generate] cache_dtype must be one of {CACHE_DTYPES}, got "
                         f"{cache_dtype!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"[generate] max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if speculative not in (None, "mtp"):
        raise ValueError(f"[generate] speculative must be None or 'mtp', got {speculative!r}")
    if speculative == "mtp" and model.config.num_nextn_predict_layers < 1:
        raise ValueError("[generate] speculative='mtp' needs an MTP module "
                         "(num_nextn_predict_layers >= 1)")
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, (int, np.integer)) \
            or num_draft_tokens < 1:
        raise ValueError(f"[generate] num_draft_tokens must be an integer >= 1, got "
                         f"{num_draft_tokens!r}")
    if eos_token_id is not None and (isinstance(eos_token_id, (bool, np.bool_)) or
                                     not isinstance(eos_token_id, (int, np.integer))):
        raise TypeError(f"[generate] eos_token_id must be an integer token id, got "
                        f"{eos_token_id!r}")  # 18.5 would never match a token
    if eos_token_id is not None and not 0 <= int(eos_token_id) < model.config.vocab_size:
        raise IndexError(f"[generate] eos_token_id {eos_token_id} outside [0, vocab_size)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"[generate] seed must be an integer >= 0, got {seed!r}")
    prompts, single = _prompts(model, prompt)
    decs = [_Decoder(model, p, int(max_new_tokens), temperature, top_k, top_p, int(seed),
                     speculative, eos_token_id, int(num_draft_tokens), cache_dtype)
            for p in prompts]
    return decs, single


def _finish(stats: Dict[str, float]) -> Dict[str, float]:
    s = dict(stats)
    s["acceptance_rate"] = s["accepted"] / s["proposed"] if s["proposed"] else 0.0
    s["tokens_per_second"] = s["new_tokens"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    s["prompt_tokens_per_second"] = (s["prompt_tokens"] / s["prompt_seconds"]
                                     if s["prompt_seconds"] else 0.0)
    return s


def generate(model, prompt, *, callback: Optional[Callable[[int, List[int]], Any]] = None,
             **kw) -> GenerationOutput:
    """See :meth:`dsv3.Model.generate`. ``callback(prompt_index, new_tokens)`` is called as
    tokens are produced."""
    decs, single = _decoders(model, prompt, **kw)
    toks, stats = [], []
    for i, d in enumerate(decs):
        got: List[int] = []
        for new in d.run():
            got.extend(new)
            if callback is not None:
                callback(i, new)
        toks.append(np.array(got, np.int64))
        stats.append(_finish(d.stats))
    if single:
        return GenerationOutput(toks[0], stats[0])
    total = {k: sum(s[k] for s in stats) for k in decs[0].stats}
    return GenerationOutput(toks, _finish(total), stats)


def stream(model, prompt, **kw) -> Iterator[int]:
    """Yield the new tokens of ONE prompt one at a time as they are produced."""
    decs, single = _decoders(model, prompt, **kw)
    if not single:
        raise ValueError("[stream] give one prompt (a 1-D sequence of token ids)")
    for new in decs[0].run():
        yield from new
