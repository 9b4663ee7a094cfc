"""The CPU thread policy: the fastest measured count wins, never more than torch's default, and the
probe changes neither the model nor the random generator."""
import torch

from kdrl.cpu_threads import apply_cpu_threads, candidate_counts, fastest_thread_count
from kdrl.demo import build_tokenizer, make_model


def _model():
    return make_model(build_tokenizer(), hidden_size=32, layers=1, heads=4, intermediate=64, seed=0)


def test_candidates_run_from_one_to_the_default():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(6) == [1, 2, 4, 6]
    assert candidate_counts(8) == [1, 2, 4, 8]


def test_the_fastest_count_wins_and_the_default_is_restored():
    model = _model()
    before = torch.get_num_threads()
    # a timer that reports many threads as faster, then one that reports one thread as faster
    many = fastest_thread_count(model, default=4, timer=lambda m, b: 1.0 / torch.get_num_threads())
    few = fastest_thread_count(model, default=4, timer=lambda m, b: float(torch.get_num_threads()))
    assert (many, few) == (4, 1)
    tie = fastest_thread_count(model, default=4, timer=lambda m, b: 1.0)
    assert tie == 1  # equal times: the fewer threads
    assert torch.get_num_threads() == before


def test_the_probe_leaves_weights_mode_and_generator_alone():
    model = _model()
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seen = []
    fastest_thread_count(model, default=2, timer=lambda m, b: seen.append([t.shape for t in b]) or 0.0)
    assert torch.equal(torch.rand(3), expected)
    assert model.training
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert len(seen) == 4 * 2 and seen[0][1][1] == 1  # 1 warm-up + 3 rounds, 2 counts; one decode token per row


def test_a_given_count_is_used_and_auto_never_exceeds_the_default():
    model = _model()
    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads(1, torch.device("cpu"), model) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        chosen = apply_cpu_threads(0, torch.device("cpu"), model)  # real timing on the tiny model
        assert chosen in (1, 2) and torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)
