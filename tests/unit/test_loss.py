"""Chunked cross-entropy: same loss and gradients as the plain one, bounded saved bytes."""

import pytest
import torch
import torch.nn.functional as F

from framework.components.loss import chunked_cross_entropy
from planner.costs import loss_transient_bytes


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_equals_plain_cross_entropy_loss_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (2, 50))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    reference = F.cross_entropy((hidden @ weight.t()).reshape(-1, 300), targets.reshape(-1))
    expected = torch.autograd.grad(reference, (hidden, weight))
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def _saved_activation_bytes(vocab: int, chunk: int) -> int:
    hidden = torch.randn(256, 32, requires_grad=True)
    weight = torch.randn(vocab, 32, requires_grad=True)
    targets = torch.randint(0, vocab, (256,))
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, weight, targets, chunk)
    return sum(storages.values())


def test_saved_bytes_do_not_grow_with_vocab_or_chunk():
    small = _saved_activation_bytes(vocab=100, chunk=16)
    huge_vocab = _saved_activation_bytes(vocab=20_000, chunk=16)
    big_chunk = _saved_activation_bytes(vocab=20_000, chunk=256)
    # hidden (256 x 32 fp32) + int64 targets + one fp32 log-sum-exp per token
    expected = 256 * 32 * 4 + 256 * 8 + 256 * 4
    assert small == huge_vocab == big_chunk == expected
    assert expected < 256 * 20_000 * 4 / 100  # far below the full logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_working_set_is_one_fp32_chunk_measured_by_torchs_mem_tracker(dtype):
    """torch's MemTracker (not this project's code) counts the step's peak: over the inputs
    and the two gradients comes the planner's loss working set (planner/costs.py
    loss_transient_bytes: one fp32 [chunk x vocab] block, its copy in the training dtype and
    the fp32 accumulator): the planner's sum is within 0.5% below and 3% above the peak."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tokens, hidden_size, vocab, chunk = 2048, 64, 4000, 512
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size, dtype=dtype))
    targets = torch.randint(0, vocab, (tokens,))
    tracker = MemTracker()
    tracker.track_external(hidden, weight)
    with tracker:
        chunked_cross_entropy(hidden, weight, targets, chunk).backward()
    peak = sum(stats.get("Total", 0) for stats in tracker.get_tracker_snapshot("peak").values())
    size = torch.finfo(dtype).bits // 8
    # the inputs and the hidden states' gradient; in bf16 the weight's gradient is made from
    # the fp32 accumulator after the last chunk, when the chunk's block is already freed
    inputs_and_grads = (2 * tokens + vocab) * hidden_size * size
    if dtype == torch.float32:
        inputs_and_grads += vocab * hidden_size * size  # the accumulator is the gradient
    # what the planner adds for the loss phase: the states and gradients plus its working set
    predicted = inputs_and_grads + loss_transient_bytes(chunk, vocab, hidden_size, size)
    # below by at most the loss's small index and log-sum-exp tensors (< 0.5%), over by <= 1%
    assert peak * 0.995 <= predicted <= peak * 1.01, (peak, predicted)
