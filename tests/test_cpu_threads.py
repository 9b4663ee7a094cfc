"""The CPU thread policy: the fastest measured count of each kind of work wins, never more than
torch's default, the probe changes neither the model nor the random generator, and the hf engine
decodes under the decode count."""
import torch

from kdrl import cpu_threads
from kdrl.cpu_threads import ThreadPolicy, apply_cpu_threads, candidate_counts, decode_threads, fastest_thread_counts
from kdrl.demo import build_tokenizer, make_model


def _model():
    return make_model(build_tokenizer(), hidden_size=32, layers=1, heads=4, intermediate=64, seed=0)


def test_candidates_run_from_one_to_the_default():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(6) == [1, 2, 4, 6]
    assert candidate_counts(8) == [1, 2, 4, 8]


def test_the_fastest_count_of_each_kind_wins_and_the_default_is_restored():
    model = _model()
    before = torch.get_num_threads()

    def dense_likes_threads(m, ids):  # decode-like batches (one token per row) are fastest with few
        threads = torch.get_num_threads()
        return 1.0 / threads if ids.shape[1] > 1 else float(threads)

    assert fastest_thread_counts(model, default=4, timer=dense_likes_threads) == ThreadPolicy(4, 1, measured=True)
    assert fastest_thread_counts(model, default=4, timer=lambda m, ids: float(torch.get_num_threads())) \
        == ThreadPolicy(1, 1, measured=True)
    tie = fastest_thread_counts(model, default=4, timer=lambda m, ids: 1.0)
    assert tie == ThreadPolicy(1, 1, measured=True)  # equal times: the fewer threads
    assert torch.get_num_threads() == before


def test_the_probe_leaves_weights_mode_and_generator_alone():
    model = _model()
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seen = []
    fastest_thread_counts(model, default=2, timer=lambda m, ids: seen.append(tuple(ids.shape)) or 0.0)
    assert torch.equal(torch.rand(3), expected)
    assert model.training
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    # 1 warm-up + 3 rounds, 2 counts, a dense and a decode batch each: 2048 tokens (the tiny model's cap)
    assert len(seen) == 4 * 2 * 2 and seen[0] == (64, 32) and seen[1] == (64, 1)


def test_a_given_count_is_used_and_auto_never_exceeds_the_default():
    model = _model()
    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads(1, torch.device("cpu"), model) == ThreadPolicy(1, 1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        chosen = apply_cpu_threads(0, torch.device("cpu"), model)  # real timing on the tiny model
        assert chosen.measured and {chosen.dense, chosen.decode} <= {1, 2}
        assert torch.get_num_threads() == chosen.dense and cpu_threads.current_policy() == chosen
    finally:
        torch.set_num_threads(before)


def test_decoding_runs_under_the_decode_count_and_restores_the_dense_one(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_policy", ThreadPolicy(dense=2, decode=1))
    try:
        torch.set_num_threads(2)
        with decode_threads():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(cpu_threads, "_policy", None)  # no policy (off the CPU): unchanged
        with decode_threads():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_start_up_line_says_the_counts_and_how_they_were_chosen():
    assert ThreadPolicy(2, 1, measured=True).describe() == \
        "2 CPU threads (1 while decoding), measured at start-up (train.cpu_threads=0)"
    assert ThreadPolicy(1, 1).describe() == "1 CPU thread, train.cpu_threads"


def test_the_hf_engine_decodes_under_the_decode_count(tiny_overrides, monkeypatch):
    from kdrl.build import build
    from kdrl.config import load_config
    from kdrl.rollout import SamplingParams

    run = build(load_config(None, tiny_overrides + ["train.cpu_threads=1"]))
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_policy", ThreadPolicy(dense=2, decode=1))
    seen = []
    hook = run.student.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    try:
        torch.set_num_threads(2)
        run.student_engine.generate(run.train_problems[:2], 2, SamplingParams(1.0, 1.0, 4))
        assert seen and set(seen) == {1}  # the prefill and every decoding step
        assert torch.get_num_threads() == 2  # scoring and training go on under the dense count
    finally:
        hook.remove()
        torch.set_num_threads(before)
