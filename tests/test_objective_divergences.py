"""KL estimators, vocabulary divergences, and their chunked computation from hidden states."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdrl.objective import SAMPLED_KL, vocab_terms, vocab_terms_chunked
from kdrl.objective.divergences import fkl, jsd, rkl, topk

D = torch.float64


def _rows(n, v, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=D), -1)


# --------------------------------------------------------------------------- sampled estimators

def _expected_grad(estimator, theta, teacher):
    """E_{o~π_θ}[∇_θ k(o)], the expectation enumerated; the gradient flows through log π_θ(o) only."""
    logp = torch.log_softmax(theta, -1)
    value = (logp.exp().detach() * SAMPLED_KL[estimator](logp, teacher)).sum()
    return torch.autograd.grad(value, theta)[0]


def _grad(fn, theta):
    return torch.autograd.grad(fn(torch.log_softmax(theta, -1)), theta)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_estimator_gradients_match_exact_kls(seed):
    theta = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    teacher = _rows(1, 5, seed + 10)[0]
    torch.testing.assert_close(_expected_grad("k2", theta, teacher),
                               _grad(lambda lp: rkl(lp, teacher), theta), atol=1e-6, rtol=0)
    torch.testing.assert_close(_expected_grad("k3", theta, teacher),
                               _grad(lambda lp: fkl(lp, teacher), theta), atol=1e-6, rtol=0)
    torch.testing.assert_close(_expected_grad("k1", theta, teacher), torch.zeros(5, dtype=D), atol=1e-12, rtol=0)


def test_sampled_estimator_values():
    s, t = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(SAMPLED_KL["k1"](s, t), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(SAMPLED_KL["k2"](s, t), torch.tensor([0.125, 0.5]))
    torch.testing.assert_close(SAMPLED_KL["k3"](s, t), torch.exp(-(s - t)) - 1 + (s - t))


# --------------------------------------------------------------------------- JSD

def test_jsd_limits_and_textbook_value():
    s, t = _rows(4, 6, 0), _rows(4, 6, 1)
    b = 1e-4
    torch.testing.assert_close(jsd(s, t, beta=b) / b, fkl(s, t), rtol=1e-3, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1 - b) / b, rkl(s, t), rtol=1e-3, atol=0)
    p, q = s.exp(), t.exp()
    m = 0.5 * (p + q)
    textbook = 0.5 * (q * (q / m).log()).sum(-1) + 0.5 * (p * (p / m).log()).sum(-1)
    torch.testing.assert_close(jsd(s, t, beta=0.5), textbook)


@pytest.mark.parametrize("b", [0.0, 1.0])
def test_jsd_endpoints_are_zero_without_nan(b):
    s = _rows(3, 6, 0).requires_grad_()
    value = jsd(s, _rows(3, 6, 1), beta=b)
    assert torch.equal(value, torch.zeros(3, dtype=D))
    value.sum().backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- top-k with a tail bucket

def test_topk_equals_rkl_with_full_or_one_token_tail():
    s, t = _rows(4, 6, 0), _rows(4, 6, 1)
    torch.testing.assert_close(topk(s, t, k=6), rkl(s, t))
    torch.testing.assert_close(topk(s, t, k=5), rkl(s, t))  # the tail is the one remaining token


def test_topk_is_a_divergence():
    s, t = _rows(50, 8, 0), _rows(50, 8, 1)
    assert (topk(s, t, k=3) >= 0).all()
    assert (topk(s, t, k=3) > 1e-6).all()
    torch.testing.assert_close(topk(t, t, k=3), torch.zeros(50, dtype=D))


def test_topk_zero_when_topk_and_tail_mass_agree_but_not_for_renormalised_match():
    t = torch.log(torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1]], dtype=D))
    same_tail_mass = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]], dtype=D))
    torch.testing.assert_close(topk(same_tail_mass, t, k=2), torch.zeros(1, dtype=D))
    # top-2 renormalised identical (4:3), but only 0.7 → 0.35 of the mass on them: not zero
    renormalised_match = torch.log(torch.tensor([[0.2, 0.15, 0.65 / 3, 0.65 / 3, 0.65 / 3]], dtype=D))
    assert topk(renormalised_match, t, k=2).item() > 0.1


# --------------------------------------------------------------------------- chunked == unchunked

N, H, V = 7, 4, 11


def _inputs(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N, H, generator=g, dtype=D, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=D, requires_grad=True) if bias else None
    ids = torch.randint(V, (N,), generator=g)
    teacher_hidden, teacher_weight = torch.randn(N, H, generator=g, dtype=D), torch.randn(V, H, generator=g, dtype=D)
    return student_hidden, weight, b, ids, teacher_hidden, teacher_weight


def _values_and_grads(fn, divergence, **kw):
    student_hidden, weight, bias, ids, teacher_hidden, teacher_weight = _inputs()
    lp, ent, div = fn(student_hidden, weight, bias, ids, teacher_hidden, teacher_weight, divergence, **kw)
    g = torch.Generator().manual_seed(5)
    total = (torch.randn(N, generator=g, dtype=D) * lp).sum() + (torch.randn(N, generator=g, dtype=D) * ent).sum()
    if div is not None:
        total = total + (torch.randn(N, generator=g, dtype=D) * div).sum()
    grads = torch.autograd.grad(total, (student_hidden, weight, bias))
    return (lp, ent, div), grads


@pytest.mark.parametrize("divergence, kw", [(None, {}), ("rkl", {}), ("fkl", {}), ("jsd", {"beta": 0.3}),
                                            ("topk", {"k": 3})])
@pytest.mark.parametrize("chunk_size", [1, 3, N, 10])
def test_chunked_equals_unchunked(divergence, kw, chunk_size):
    (lp, ent, div), grads = _values_and_grads(vocab_terms, divergence, **kw)
    (lp_c, ent_c, div_c), grads_c = _values_and_grads(
        lambda *a: vocab_terms_chunked(*a, chunk_size=chunk_size, **kw), divergence)
    torch.testing.assert_close(lp_c, lp)
    torch.testing.assert_close(ent_c, ent)
    if divergence is None:
        assert div_c is None
    else:
        torch.testing.assert_close(div_c, div)
        assert (div_c >= 0).all()
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)


def test_token_logprobs_and_entropy_by_hand():
    student_hidden, weight, bias, ids, *_ = _inputs()
    lp, ent, div = vocab_terms_chunked(student_hidden, weight, bias, ids, chunk_size=2)
    logp = torch.log_softmax(student_hidden @ weight.T + bias, -1)
    torch.testing.assert_close(lp, logp[torch.arange(N), ids])
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1))
    assert div is None


def test_chunked_upcasts_low_precision_to_float32():
    student_hidden, weight, _, ids, teacher_hidden, teacher_weight = _inputs(bias=False)
    lp, ent, div = vocab_terms_chunked(student_hidden.detach().bfloat16().requires_grad_(),
                                       weight.detach().bfloat16(), None, ids, teacher_hidden.bfloat16(),
                                       teacher_weight.bfloat16(), "rkl", chunk_size=3)
    assert lp.dtype == ent.dtype == div.dtype == torch.float32


def test_vocabulary_mismatch_is_an_error():
    student_hidden, weight, _, ids, teacher_hidden, teacher_weight = _inputs()
    with pytest.raises(ValueError, match="vocabulary"):
        vocab_terms_chunked(student_hidden, weight, None, ids, teacher_hidden, teacher_weight[:-1], "rkl")


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("divergence", ["rkl", "jsd", "topk"])
def test_chunked_never_forms_full_logits(divergence):
    n, v, h, chunk = 32, 48, 4, 4
    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    ids = torch.randint(v, (n,), generator=g)
    with _LargestTensor() as mode:
        lp, ent, div = vocab_terms_chunked(student_hidden, weight, None, ids, torch.randn(n, h), torch.randn(v, h),
                                           divergence, chunk_size=chunk, **({"k": 5} if divergence == "topk" else {}))
        (lp.sum() + ent.sum() + div.sum()).backward()
    assert weight.grad is not None and student_hidden.grad is not None
    assert mode.largest <= 2 * chunk * v < n * v  # JSD stacks two [chunk, V] rows; never [N, V]


def test_metric_only_entropy_has_no_graph():
    """An output that gets no gradient would keep its chunks' recomputed tensors alive to the end
    of backward (O(N·V) memory): a metric-only entropy is computed without a graph."""
    student_hidden, weight, bias, ids, *_ = _inputs()
    lp, ent, _ = vocab_terms_chunked(student_hidden, weight, bias, ids, chunk_size=2, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    _, ent_ref, _ = vocab_terms(student_hidden, weight, bias, ids)
    torch.testing.assert_close(ent, ent_ref.detach())


@pytest.mark.parametrize("divergence, kw", [("rkl", {}), ("jsd", {"beta": 0.7})])
def test_chunked_equals_unchunked_at_a_temperature(divergence, kw):
    (lp, ent, div), grads = _values_and_grads(vocab_terms, divergence, temperature=0.7, **kw)
    (lp_c, ent_c, div_c), grads_c = _values_and_grads(
        lambda *a, **k: vocab_terms_chunked(*a, chunk_size=2, **k), divergence, temperature=0.7, **kw)
    for a, b in zip((lp_c, ent_c, div_c, *grads_c), (lp, ent, div, *grads)):
        torch.testing.assert_close(a, b)
    (lp_1, *_), _ = _values_and_grads(vocab_terms, divergence, **kw)
    assert not torch.allclose(lp, lp_1)  # the temperature is applied, not ignored


def _peak_live_bytes(fn) -> int:
    """Highest total of live CPU tensor bytes while ``fn`` runs (torch's allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jsd"])
def test_chunked_backward_keeps_one_chunk_of_logits_alive(divergence):
    """The loss and its backward hold O(chunk · V) bytes at a time, not O(N · V): each chunk is
    recomputed in backward and freed before the next (benchmarks/kd_memory.py measures it at scale)."""
    n, v, h, chunk = 128, 2048, 8, 8
    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    ids = torch.randint(v, (n,), generator=g)
    teacher_hidden, teacher_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)

    def run(fn):
        def loss_and_backward():
            lp, _, div = fn(student_hidden, weight, None, ids, teacher_hidden, teacher_weight, divergence,
                            entropy_grad=False)
            (lp.sum() + div.sum()).backward()
        return _peak_live_bytes(loss_and_backward)

    plain = run(vocab_terms)
    chunked = run(lambda *a, **k: vocab_terms_chunked(*a, chunk_size=chunk, **k))
    row_bytes = v * 4  # one float32 row of logits
    assert plain >= 3 * n * row_bytes  # several [N, V] tensors alive at once
    assert chunked <= 16 * chunk * row_bytes + 2 * weight.numel() * 4  # a few [chunk, V] + the weight grad
    assert chunked * 8 < plain
