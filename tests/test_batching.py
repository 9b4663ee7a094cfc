"""Micro-batches by length: the split is the cheapest, and bucketed, trimmed micro-batches give the
same loss, gradient and teacher log-probs as the plain split of the same rows."""
import torch

from kdrl.batching import length_buckets, micro_batches, response_lengths, trimmed
from kdrl.config import load_config


def test_buckets_minimise_padded_tokens_plus_overhead():
    lengths = torch.tensor([3, 40, 2, 38, 1, 39])
    runs = length_buckets(lengths, max_rows=6, prompt_width=2, overhead_tokens=10)
    assert [sorted(r.tolist()) for r in runs] == [[1, 3, 5], [0, 2, 4]]  # the long rows, then the short
    # with a large per-forward cost one micro-batch is cheaper than two
    assert len(length_buckets(lengths, max_rows=6, prompt_width=2, overhead_tokens=10_000)) == 1
    # never more rows than allowed, every row exactly once
    runs = length_buckets(torch.randint(0, 50, (37,)), max_rows=8, prompt_width=5)
    assert all(len(r) <= 8 for r in runs)
    assert sorted(torch.cat(runs).tolist()) == list(range(37))


def test_response_lengths_count_to_the_last_kept_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]).float()
    assert response_lengths(mask).tolist() == [2, 3, 0, 4]


def _rollouts_and_run(tiny_overrides, recipe_overrides):
    from kdrl.build import build
    from kdrl.rollout import SamplingParams
    from kdrl.rollout.rows import score_rewards
    from kdrl.trainer import make_batch

    run = build(load_config(None, tiny_overrides + recipe_overrides))
    torch.manual_seed(0)
    rollouts = run.student_engine.generate(run.train_problems[:4], 4, SamplingParams(1.0, 1.0, 12))
    assert rollouts.response_mask.sum(-1).unique().numel() > 1  # rows of different lengths
    return run, rollouts, make_batch, score_rewards


def test_bucketed_teacher_scores_equal_one_full_width_pass(tiny_overrides):
    from kdrl.models import output_projection, response_hidden_states, token_logprobs_from_hidden

    run, rollouts, _, _ = _rollouts_and_run(tiny_overrides, ["train.micro_batch_size=3"])
    out = run.teacher_scorer.score(rollouts, need_hidden=True)
    teacher = run.teacher_scorer.model
    with torch.no_grad():
        hidden = response_hidden_states(teacher, rollouts.input_ids(), rollouts.attention_mask(),
                                        rollouts.prompt_ids.shape[1])
        weight, bias = output_projection(teacher)
        expected = token_logprobs_from_hidden(hidden, weight, bias, rollouts.response_ids, 1024, 1.0)
    mask = rollouts.response_mask
    torch.testing.assert_close(out.token_logprobs, expected * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states * mask[..., None], hidden * mask[..., None], atol=1e-5, rtol=0)


def test_bucketed_micro_batches_give_the_full_batch_loss_and_gradient(tiny_overrides):
    run, rollouts, make_batch, score_rewards = _rollouts_and_run(tiny_overrides, [])
    from kdrl.trainer import student_forward

    teacher_out = run.teacher_scorer.score(rollouts, need_hidden=run.objective.needs_teacher_hidden) \
        if run.objective.needs_teacher else None
    batch = run.objective.prepare(make_batch(rollouts, score_rewards(run.reward_fn, rollouts), teacher_out, None), 0)
    rows = torch.arange(batch.num_rows)

    def loss_and_grad(micros):
        run.student.zero_grad(set_to_none=True)
        total = 0.0
        for micro in micros:
            loss, _ = run.objective.loss(micro, student_forward(run, micro))
            loss.backward()
            total += float(loss.detach())
        return total, torch.cat([p.grad.flatten() for p in run.student.parameters() if p.grad is not None])

    full_loss, full_grad = loss_and_grad([batch])
    micros = micro_batches(batch, rows, max_rows=5)
    assert len(micros) > 1 and any(m.response_ids.shape[1] < batch.response_ids.shape[1] for m in micros)
    bucket_loss, bucket_grad = loss_and_grad(micros)
    assert abs(full_loss - bucket_loss) < 1e-5
    torch.testing.assert_close(bucket_grad, full_grad, atol=1e-6, rtol=1e-4)


def test_trimming_keeps_whole_batch_fields_and_cuts_per_token_ones(tiny_overrides):
    run, rollouts, make_batch, score_rewards = _rollouts_and_run(tiny_overrides, [])
    batch = make_batch(rollouts, score_rewards(run.reward_fn, rollouts), None, None)
    cut = trimmed(batch, 3)
    assert cut.response_ids.shape[1] == 3 and cut.sampler_logprobs.shape[1] == 3
    assert cut.input_ids.shape[1] == batch.prompt_width + 3
    assert torch.equal(cut.rewards, batch.rewards)
    assert torch.equal(cut.input_ids, batch.input_ids[:, :batch.prompt_width + 3])


def test_a_slice_of_rows_carries_the_problems_of_its_rows():
    """TrainBatch.rows: row b of any slice answers problems[b // group_size], as in the full batch."""
    import dataclasses

    from kdrl.types import Problem
    from test_objective import make_batch

    batch, _, _ = make_batch(lengths=(3, 1, 4, 2, 2, 3), rewards=(1.0, 0.0, 0.0, 0.0, 1.0, 1.0))
    batch = dataclasses.replace(batch, problems=[Problem(id=f"p{g}", prompt="", answer="") for g in range(3)])

    def row_problems(b):
        return [b.problems[row // b.group_size].id for row in range(b.num_rows)]

    full = row_problems(batch)
    whole = batch.rows(slice(2, 6))
    assert (whole.group_size, [p.id for p in whole.problems]) == (2, ["p1", "p2"])
    for index in (torch.tensor([5, 0, 3]), torch.tensor([1, 2]), slice(0, 3)):
        part = batch.rows(index)
        assert part.group_size == 1 and row_problems(part) == [full[i] for i in torch.arange(6)[index].tolist()]
    for micro in micro_batches(batch, torch.arange(6), max_rows=4):
        assert len(micro.problems) * micro.group_size == micro.num_rows
