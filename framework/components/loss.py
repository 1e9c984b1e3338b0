"""Chunked cross-entropy: the full [tokens x vocab] logits are never materialised or saved.

Forward walks the tokens in chunks, keeping only each token's log-sum-exp; backward recomputes
one chunk of logits at a time (the Cut Cross-Entropy idea). Saved for backward: the hidden
states (already alive as the final norm's output), the targets and one fp32 per token.
Working set (measured with torch's MemTracker, tests/unit/test_loss.py): one fp32
[chunk_tokens x vocab] block, built in place (plus its copy in the training dtype when that is
not fp32) and the fp32 [vocab x hidden] weight-gradient accumulator, accumulated in place.
"""

import torch
from torch import Tensor


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int
    ) -> Tensor:
        tokens = hidden.shape[0]
        w = weight.to(hidden.dtype)
        compute = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits for bf16
        lse = torch.empty(tokens, dtype=compute, device=hidden.device)
        total = torch.zeros((), dtype=compute, device=hidden.device)
        for start in range(0, tokens, chunk_tokens):
            stop = min(start + chunk_tokens, tokens)
            logits = (hidden[start:stop] @ w.t()).to(compute)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
            total += (chunk_lse - target_logit).sum()
            lse[start:stop] = chunk_lse
            del logits  # before the next chunk's matmul: one chunk of logits at a time
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_tokens = chunk_tokens
        return total / tokens

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        tokens = hidden.shape[0]
        w = weight.to(hidden.dtype)
        compute = lse.dtype
        scale = grad_loss.to(compute) / tokens
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=compute, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, tokens, ctx.chunk_tokens):
            stop = min(start + ctx.chunk_tokens, tokens)
            h = hidden[start:stop]
            # d loss / d logits = softmax(logits) - onehot(target), times 1/tokens, built in
            # place in one fp32 chunk (no second chunk-sized temporary)
            probs = (h @ w.t()).to(compute)
            probs.sub_(lse[start:stop, None]).exp_()
            probs[torch.arange(stop - start, device=h.device), targets[start:stop]] -= 1.0
            probs.mul_(scale)
            grad_logits = probs.to(hidden.dtype)  # the same tensor in fp32
            if grad_hidden is not None:
                torch.matmul(grad_logits, w, out=grad_hidden[start:stop])
            if grad_weight is not None:
                # accumulate in place: no [vocab, hidden] temporary per chunk
                grad_weight.addmm_(probs.t(), h.to(compute))
            del probs, grad_logits  # before the next chunk's matmul
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 4096
) -> Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T against targets.

    hidden [..., H], weight [V, H], targets [...] (int64) with matching leading shape.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedCrossEntropy.apply(flat_hidden, weight, targets.reshape(-1), chunk_tokens)
