"""The hf engine: one prefill per prompt group, EOS per sequence, exact sampler log-probs from generate."""
import pytest
import torch

from kdrl.config import load_config
from kdrl.models import output_projection, response_hidden_states
from kdrl.rollout import SamplingParams


@pytest.fixture
def run(tiny_overrides):
    from kdrl.build import build

    return build(load_config(None, tiny_overrides))


def _recomputed_logprobs(run, rollouts, temperature):
    """log softmax(logits / T) of the sampled tokens, from a separate full forward pass."""
    with torch.no_grad():
        hidden = response_hidden_states(run.student, rollouts.input_ids(), rollouts.attention_mask(),
                                        rollouts.prompt_ids.shape[1])
        weight, bias = output_projection(run.student)
        logprobs = torch.log_softmax((hidden @ weight.T) / temperature, -1)
    return logprobs, logprobs.gather(-1, rollouts.response_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_logprobs_equal_a_recomputed_forward(run, temperature, top_p):
    torch.manual_seed(0)
    rollouts = run.student_engine.generate(run.train_problems[:3], 4, SamplingParams(temperature, top_p, 24))
    full, recomputed = _recomputed_logprobs(run, rollouts, temperature)
    mask = rollouts.response_mask
    torch.testing.assert_close(rollouts.sampler_logprobs, recomputed * mask, atol=2e-5, rtol=0)
    # top-p: every sampled token lies in the nucleus (tokens more likely than it hold < top_p of the mass)
    probs = full.exp()
    chosen = probs.gather(-1, rollouts.response_ids[..., None])
    mass_above = (probs * (probs > chosen)).sum(-1)
    assert bool((mass_above[mask > 0] < top_p + 1e-6).all())


def test_each_sequence_stops_at_its_own_eos(run):
    torch.manual_seed(1)
    rollouts = run.student_engine.generate(run.train_problems[:4], 4, SamplingParams(1.0, 1.0, 40))
    lengths = rollouts.response_mask.sum(-1)
    assert lengths.unique().numel() > 1  # rows end at different steps
    eos = run.tokenizer.eos_token_id
    for row in range(rollouts.num_rows):
        n = int(lengths[row])
        if not rollouts.truncated[row]:
            assert int(rollouts.response_ids[row, n - 1]) == eos  # the last kept token is the EOS
        assert bool((rollouts.response_ids[row, n:] == run.tokenizer.pad_token_id).all())
        assert bool((rollouts.sampler_logprobs[row, n:] == 0).all())


def test_each_prompt_is_prefilled_once_for_its_group(run):
    """The model sees each prompt's tokens once (batch = prompts), then one token per row and step;
    greedy output equals plain generate on the G-times repeated prompts (what num_return_sequences does)."""
    problems, group = run.train_problems[:3], 4
    calls = []
    hook = run.student.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        rollouts = run.student_engine.generate(problems, group, SamplingParams(0.0, 1.0, 10))
    finally:
        hook.remove()
    width = rollouts.prompt_ids.shape[1]
    assert calls[0] == (len(problems), width - 1)  # the prefill: one row per prompt
    assert all(shape == (len(problems) * group, 1) for shape in calls[1:])  # then single tokens per row

    plain = run.student.generate(input_ids=rollouts.prompt_ids, attention_mask=rollouts.prompt_mask,
                                 do_sample=False, max_new_tokens=10,
                                 pad_token_id=run.tokenizer.pad_token_id, eos_token_id=run.tokenizer.eos_token_id,
                                 top_k=None, top_p=None, temperature=None)
    expected = plain[:, width:]
    got = rollouts.response_ids[:, :expected.shape[1]]
    mask = rollouts.response_mask[:, :expected.shape[1]] > 0
    assert torch.equal(got[mask], expected[mask])


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)])
def test_dropping_ended_rows_changes_no_token_and_no_draw(run, temperature, top_p, monkeypatch):
    """Rows that ended leave the forward batch; the running rows get the same tokens, log-probs and
    entropies, and the generator ends in the same state, as when every row stays to the end."""
    from kdrl.rollout.hf import TokenSampler

    outputs = []
    for drop_at in (2.0, 1e-9, TokenSampler.drop_finished_at):  # never, at the first ended row, the default
        monkeypatch.setattr(TokenSampler, "drop_finished_at", drop_at)
        torch.manual_seed(3)
        rollouts = run.student_engine.generate(run.train_problems[:4], 4, SamplingParams(temperature, top_p, 40))
        outputs.append((rollouts, torch.rand(4)))
    (kept, after), others = outputs[0], outputs[1:]
    if temperature > 0:
        assert kept.response_mask.sum(-1).unique().numel() > 1  # rows end at different steps
    for rollouts, rng_after in others:
        for name in ("response_ids", "response_mask", "sampler_logprobs", "sampler_entropy", "truncated"):
            assert torch.equal(getattr(rollouts, name), getattr(kept, name)), name
        assert torch.equal(rng_after, after)


def test_rows_leave_the_forward_batch_as_they_end(run, monkeypatch):
    from kdrl.rollout.hf import TokenSampler

    monkeypatch.setattr(TokenSampler, "drop_finished_at", 1e-9)
    sizes = []
    hook = run.student.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        torch.manual_seed(1)
        rollouts = run.student_engine.generate(run.train_problems[:4], 4, SamplingParams(1.0, 1.0, 40))
    finally:
        hook.remove()
    running = [int((rollouts.response_mask[:, step - 1] > 0).sum() - (rollouts.response_ids[:, step - 1] ==
               run.tokenizer.eos_token_id).sum()) for step in range(1, len(sizes) - 1)]
    assert sizes[1] == rollouts.num_rows and sizes[2:] == running  # one forward per step, running rows only


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_the_preallocated_kv_cache_changes_no_token(run, temperature, top_p, monkeypatch):
    """Decoding with the preallocated cache gives bitwise the tokens, log-probs and entropies of
    transformers' own DynamicCache (the forward makes one when given none)."""
    from kdrl.rollout import hf, kv_cache

    made, real = [], kv_cache.preallocated_cache

    def recorded(model, capacity):
        made.append(real(model, capacity))
        return made[-1]

    outputs = []
    for make in (recorded, lambda model, capacity: None):
        monkeypatch.setattr(hf, "preallocated_cache", make)  # where the decoding loop looks it up
        torch.manual_seed(4)
        outputs.append(run.student_engine.generate(run.train_problems[:4], 4, SamplingParams(temperature, top_p, 40)))
    ours, theirs = outputs
    assert made and all(isinstance(layer, kv_cache.PreallocatedLayer) for layer in made[0].layers)
    assert ours.response_mask.sum(-1).unique().numel() > 1  # rows end at different steps (and leave the batch)
    for name in ("response_ids", "response_mask", "sampler_logprobs", "sampler_entropy", "truncated"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_a_preallocated_layer_holds_what_a_dynamic_layer_holds():
    """Appends (past the capacity too), repeats and row selections give DynamicLayer's keys and values."""
    from transformers.cache_utils import DynamicLayer

    from kdrl.rollout.kv_cache import PreallocatedLayer

    torch.manual_seed(0)
    ours, theirs = PreallocatedLayer(capacity=3), DynamicLayer()
    steps = [(torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)) for length in (2, 1)]
    for layer in (ours, theirs):
        for keys, values in steps:
            layer.update(keys, values)
        layer.batch_repeat_interleave(2)
    for keys, values in [(torch.randn(4, 3, 1, 4), torch.randn(4, 3, 1, 4))] * 2:  # now past the capacity of 3
        returned = [layer.update(keys, values) for layer in (ours, theirs)]
        assert all(torch.equal(a, b) for a, b in zip(*returned))
    for layer in (ours, theirs):
        layer.batch_select_indices(torch.tensor([3, 0]))
    assert ours.get_seq_length() == theirs.get_seq_length() == 5
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
