"""Vocabulary-parallel cross-entropy: the loss of logits split by vocabulary over a process group.

Each device of the group holds the columns ``[start, start + V/p)`` of the (rows, vocabulary)
logits and the whole target. Per row, in fp32:

* the row maximum ``m`` (all-reduce MAX), subtracted for numerical stability;
* the target's shifted logit ``z_t − m``, taken on the device that owns column ``t`` (zero on the
  others) and summed over the group (all-reduce SUM);
* the sum of exponentials ``Σ exp(z − m)`` (all-reduce SUM);

then ``loss_row = log Σ exp(z − m) − (z_t − m)``, reduced as ``F.cross_entropy`` does (mean over
the rows whose target is not ``ignore_index``, or sum). Every device ends with the whole loss.
The backward needs no communication: the gradient of the owned columns is
``softmax − one_hot(t)`` restricted to them, times the reduction's scale. Three all-reduces of one
fp32 value per row, as the cost model charges
(:func:`autoddl.engine.rules.vocab_parallel_steps`); the same method as Megatron-LM's
``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, start, mean, ignore_index):  # type: ignore[override]
        x = logits.detach().float()
        cols = x.shape[1]
        row_max = x.max(dim=1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - row_max.unsqueeze(1)
        valid = target != ignore_index
        local_t = target - start
        owned = valid & (local_t >= 0) & (local_t < cols)
        idx = local_t.clamp(0, cols - 1).unsqueeze(1)
        target_logit = shifted.gather(1, idx).squeeze(1) * owned.to(x.dtype)
        dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=1)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        per_row = (sum_exp.log() - target_logit) * valid.to(x.dtype)
        scale = 1.0 / valid.sum().to(x.dtype) if mean else torch.ones((), dtype=x.dtype)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(1), idx, owned, valid, scale)
        ctx.dtype = logits.dtype
        return (per_row.sum() * scale).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        softmax, idx, owned, valid, scale = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(1, idx, -owned.to(g.dtype).unsqueeze(1))
        g *= (valid.to(g.dtype) * scale * grad.float()).unsqueeze(1)
        return g.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 start: int, reduction: str = "mean",
                                 ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of ``logits`` (rows, V/p: this device's vocabulary columns from ``start``)
    against the whole ``target`` (rows,), over the devices of ``group``; ``reduction`` mean or
    sum. Equals ``F.cross_entropy`` of the gathered logits on every device; differentiable in
    ``logits``. Collective: every device of ``group`` must call it."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"vocabulary-parallel cross-entropy: reduction {reduction!r}")
    return _VocabParallelCE.apply(logits, target, group, int(start), reduction == "mean",
                                  int(ignore_index))
