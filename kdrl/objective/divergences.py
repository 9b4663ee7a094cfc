"""Student-vs-teacher divergences (METHODS.md §2).

Two families:

- SAMPLED_KL: per-token estimators on the sampled token only,
  ``fn(student_logprobs, other_logprobs) -> value`` elementwise, differentiable through
  ``student_logprobs``; Δ = s − τ (student minus teacher/reference log-prob).
  On tokens sampled from π_θ, E[∇k1] = 0, E[∇k2] = ∇KL(π_θ‖π_T), E[∇k3] = ∇KL(π_T‖π_θ).
- VOCAB_DIVERGENCES: exact per-position divergences over the vocabulary,
  ``fn(student_logprobs[N, V], teacher_logprobs[N, V], **params) -> [N]``.

Full-vocabulary terms are formed chunk by chunk from hidden states by
``vocab_terms_chunked`` so that [N, V] logits never exist at once (METHODS.md §2, last
paragraph): each chunk runs under activation checkpointing and is recomputed in backward.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor



def upcast(x: Tensor) -> Tensor:
    """At least float32: bf16/fp16 inputs are promoted, float64 (tests) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------- sampled-token estimators


def k1(student_logprobs: Tensor, other_logprobs: Tensor) -> Tensor:
    """k1 = Δ: unbiased estimate of KL(π_θ‖π_T), but E[∇k1] = E[∇ log π_θ] = 0
    (Schulman, "Approximating KL divergence")."""
    return student_logprobs - other_logprobs


def k2(student_logprobs: Tensor, other_logprobs: Tensor) -> Tensor:
    """k2 = ½Δ²; ∇k2 = Δ∇s, whose expectation is ∇KL(π_θ‖π_T) (reverse KL; KDRL's choice)."""
    return 0.5 * (student_logprobs - other_logprobs) ** 2


def k3(student_logprobs: Tensor, other_logprobs: Tensor) -> Tensor:
    """k3 = exp(−Δ) − 1 + Δ ≥ 0; ∇k3 = (1 − e^{−Δ})∇s, whose expectation is ∇KL(π_T‖π_θ)
    (forward KL)."""
    delta = student_logprobs - other_logprobs
    return torch.expm1(-delta) + delta


SAMPLED_KL: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": k1, "k2": k2, "k3": k3}

# --------------------------------------------------------------------------- full-vocabulary divergences


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_v p(v)(log p(v) − log q(v)) over the last dim, with 0·log 0 = 0 (no NaN where p = 0)."""
    p = logp.exp()
    support = p > 0
    return (p * (torch.where(support, logp, 0.0) - torch.where(support, logq, 0.0))).sum(-1)


def rkl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Reverse KL(p_θ‖p_T) = Σ p_θ (log p_θ − log p_T): mode seeking (KDRL, on-policy KD)."""
    return _kl(student_logprobs, teacher_logprobs)


def fkl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Forward KL(p_T‖p_θ) = Σ p_T (log p_T − log p_θ): mass covering (classic KD / SFT)."""
    return _kl(teacher_logprobs, student_logprobs)


def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD(b) = b·KL(p_T‖m) + (1−b)·KL(p_θ‖m), m = b·p_T + (1−b)·p_θ (GKD, arXiv 2306.13649).

    Convention (b weights the teacher, as in TRL's GKD): JSD(b)/b → forward KL(p_T‖p_θ) as
    b → 0 and JSD(b)/(1−b) → reverse KL(p_θ‖p_T) as b → 1; b = 0.5 is the textbook JSD.
    At b = 0 or 1 the mixture equals one of the two distributions and JSD is exactly 0
    (use fkl / rkl for those limits). log m = logsumexp(log b + log p_T, log(1−b) + log p_θ).
    """
    if beta <= 0.0 or beta >= 1.0:
        return _kl(student_logprobs, student_logprobs)  # exactly 0, still attached to the graph
    log_m = torch.logsumexp(torch.stack([teacher_logprobs + math.log(beta),
                                         student_logprobs + math.log1p(-beta)]), dim=0)
    return beta * _kl(teacher_logprobs, log_m) + (1.0 - beta) * _kl(student_logprobs, log_m)


def topk(student_logprobs: Tensor, teacher_logprobs: Tensor, k: int = 32) -> Tensor:
    """Reverse KL over the teacher's k most likely tokens plus ONE tail bucket.

    Both distributions are collapsed onto k + 1 outcomes: the k tokens, and "any other
    token" carrying each distribution's remaining mass. The value is a true KL between
    those coarse distributions: ≥ 0, and 0 only when the two agree on the k tokens and on
    the tail mass (a renormalised top-k could be driven to 0 by a student that matches the
    teacher's ranking while putting arbitrary mass elsewhere). k ≥ V is the full reverse KL.
    """
    vocab = student_logprobs.shape[-1]
    if k >= vocab:
        return rkl(student_logprobs, teacher_logprobs)
    index = teacher_logprobs.topk(k, dim=-1).indices
    in_topk = torch.zeros_like(student_logprobs, dtype=torch.bool).scatter_(-1, index, True)

    def collapse(logprobs: Tensor) -> Tensor:  # [N, V] -> [N, k + 1]: the k tokens, then the tail
        tail = torch.logsumexp(logprobs.masked_fill(in_topk, -math.inf), dim=-1, keepdim=True)
        return torch.cat([logprobs.gather(-1, index), tail], dim=-1)

    return rkl(collapse(student_logprobs), collapse(teacher_logprobs))


VOCAB_DIVERGENCES: dict[str, Callable[..., Tensor]] = {"rkl": rkl, "fkl": fkl, "jsd": jsd, "topk": topk}


# --------------------------------------------------------------------------- from hidden states, chunked


def _log_softmax(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def vocab_terms(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                token_ids: Tensor, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, divergence: Optional[str] = None, *,
                teacher_bias: Optional[Tensor] = None, temperature: float = 1.0, entropy_grad: bool = True,
                **divergence_kwargs) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The unchunked computation: [N, V] logits at once. Same inputs and outputs as
    ``vocab_terms_chunked`` (which calls it once per chunk)."""
    student = _log_softmax(student_hidden, student_weight, student_bias, temperature)
    token_logprobs = student.gather(-1, token_ids[:, None]).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -_kl(student, torch.zeros_like(student))  # H = −Σ p log p
    if divergence is None:
        return token_logprobs, entropy, None
    teacher = _log_softmax(teacher_hidden, teacher_weight, teacher_bias, temperature)
    return token_logprobs, entropy, VOCAB_DIVERGENCES[divergence](student, teacher, **divergence_kwargs)


def vocab_terms_chunked(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                        token_ids: Tensor, teacher_hidden: Optional[Tensor] = None,
                        teacher_weight: Optional[Tensor] = None, divergence: Optional[str] = None,
                        chunk_size: int = 1024, *, teacher_bias: Optional[Tensor] = None,
                        temperature: float = 1.0, entropy_grad: bool = True,
                        **divergence_kwargs) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Token log-probs [N], student entropy [N] and (optionally) a vocabulary divergence [N].

    Logits are formed in float32 (float64 inputs stay float64) for ``chunk_size``
    positions at a time; each chunk runs under ``checkpoint(use_reentrant=False)``, so
    only its inputs are kept and its [chunk, V] tensors are recomputed in backward: at no
    time do [N, V] logits exist. Weights are cast once, outside the chunks, so the weight
    gradient accumulates over chunks in float32. ``temperature`` divides both models'
    logits (use the sampling temperature, so log-probs match the sampler's).

    Every output with a gradient must receive one in backward (possibly zero): the saved
    tensors a chunk recomputes for an output that gets no gradient stay alive until backward
    ends, which would bring back O(N·V) memory. Hence ``entropy_grad=False`` when the entropy
    is only a metric: it is then computed without a graph.
    """
    if divergence is not None:
        if divergence not in VOCAB_DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r} (valid: {', '.join(VOCAB_DIVERGENCES)})")
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"divergence {divergence!r} needs the teacher's hidden states and output weight")
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"teacher vocabulary ({teacher_weight.shape[0]}) differs from the student's "
                             f"({student_weight.shape[0]}): token-level terms need one shared vocabulary")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    detached = lambda x: None if x is None else x.detach().to(dtype)  # noqa: E731
    weights = (cast(student_weight), cast(student_bias), detached(teacher_weight), detached(teacher_bias))
    hidden, teacher = cast(student_hidden), detached(teacher_hidden)
    body = functools.partial(_chunk, divergence=divergence, temperature=temperature, entropy_grad=entropy_grad,
                             kwargs=divergence_kwargs)

    n = hidden.shape[0]
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, *weights))
    if n == 0:
        return body(hidden, token_ids, teacher, *weights)
    outputs = []
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        args = (hidden[part], token_ids[part], None if teacher is None else teacher[part], *weights)
        outputs.append(checkpoint(body, *args, use_reentrant=False) if needs_grad else body(*args))
    token_logprobs, entropy, div = zip(*outputs)
    return torch.cat(token_logprobs), torch.cat(entropy), None if divergence is None else torch.cat(div)


def _chunk(hidden, token_ids, teacher_hidden, weight, bias, teacher_weight, teacher_bias, *,
           divergence, temperature, entropy_grad, kwargs):
    return vocab_terms(hidden, weight, bias, token_ids, teacher_hidden, teacher_weight, divergence,
                       teacher_bias=teacher_bias, temperature=temperature, entropy_grad=entropy_grad, **kwargs)
