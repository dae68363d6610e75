"""The ``moe-gpt`` model: GPT blocks whose MLP is a top-k routed mixture of experts.

Routing as in GShard (Lepikhin et al. 2020) and Switch (Fedus et al. 2021), with static shapes
only, so that ``torch.export`` captures it and every operator has a sharding rule
(:mod:`autoddl.engine.rules_moe`). The b·s tokens of a batch are cut into G groups of T tokens
(``groups``, default one per sequence); each group routes on its own:

* router probabilities ``p = softmax(x W_r)``, shape (G, T, E) for E experts;
* top-k by k rounds of ``argmax`` (round r picks the best expert not yet picked; ``topk`` has
  two outputs, which capture does not take), ``mask_r = one_hot(argmax_r, E)``;
* each expert takes at most C = min(T, ⌈k · T · capacity / E⌉) tokens of a group (``capacity``
  is the capacity factor in percent). A token's slot in its round-r expert is
  ``cumsum(mask_r, over T) − 1`` plus the slots earlier rounds filled; tokens past C are dropped
  (they pass through the residual only). This bookkeeping is in integers (exact in bf16 plans);
* the dispatch tensor ``D[g, t, e, c] = 1`` when token t of group g sits in slot c of expert e,
  the combine tensor ``W = Σ_r gate_r · D_r`` with the gates renormalized over the k chosen
  experts (Mixtral; k = 1 keeps the probability, as Switch);
* experts: ``X_e = einsum('gsec,gsd->egcd', D, x)``, two (``glu=1``: three, SwiGLU) batched
  matmuls with weights (E, d, f) and (E, f, d), and ``y = einsum('gsec,egcd->gsd', W, Y)``;
* the load-balancing loss of Switch, ``E · Σ_e f_e · P_e`` (f_e: the fraction of tokens whose
  first choice is e, P_e: the mean probability of e), weighted :data:`AUX_WEIGHT`, summed over
  layers into the training loss.

Expert parallelism in SBP terms: tokens split by group (``S(g)``) on a mesh axis make the
expert input ``S(1)`` of (E, G, C, d); the experts' batched matmuls split by expert read it
``S(0)`` with their weights ``S(0)``. The conversion ``S(1) → S(0)`` on one axis is an
all-to-all moving (p−1)/p of the local expert input (and its dual in backward, and the same for
the expert output before the combine): expert parallelism is one choice of the search space, and
the planner takes it where the experts' weights (replicated: memory and a gradient all-reduce)
cost more than the all-to-alls.

Attention: causal, with ``kv_heads`` key/value heads (grouped-query attention when fewer than
``heads``: each key/value head is expanded to its ``heads/kv_heads`` query heads, so a split of
the heads splits the key/value heads alike). Position: learned embedding (no rotary tables);
normalization: LayerNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: weight of the load-balancing loss in the training loss (Switch Transformer's α)
AUX_WEIGHT = 0.01


def expert_capacity(tokens: int, experts: int, top_k: int, capacity_pct: int) -> int:
    """Slots per expert per group: ⌈k · T · factor / E⌉, at least 1, at most T."""
    return max(1, min(tokens, math.ceil(top_k * tokens * capacity_pct / (100 * experts))))


class Attention(nn.Module):
    """Causal self-attention with ``kv_heads`` key/value heads (grouped-query when fewer than
    ``heads``); key/value projections laid out per head, so column splits split heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        hd, kvh = self.head_dim, self.kv_heads
        q = self.q(x).view(b, s, self.heads, hd).transpose(1, 2)
        kv = self.kv(x).view(b, s, kvh, 2, hd).permute(3, 0, 2, 1, 4)  # (2, b, kvh, s, hd)
        k, v = kv[0], kv[1]
        if kvh != self.heads:  # each key/value head serves heads/kv_heads query heads
            rep = self.heads // kvh
            k = k.unsqueeze(2).expand(b, kvh, rep, s, hd).reshape(b, self.heads, s, hd)
            v = v.unsqueeze(2).expand(b, kvh, rep, s, hd).reshape(b, self.heads, s, hd)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(b, s, h))


class MoE(nn.Module):
    """Top-k routed experts with a capacity, on G groups of tokens (module docstring)."""

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, capacity_pct: int,
                 groups: int, glu: bool) -> None:
        super().__init__()
        self.experts, self.top_k, self.capacity_pct = experts, top_k, capacity_pct
        self.groups, self.glu = groups, glu
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, hidden, ffn))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, ffn)) if glu else None
        self.w2 = nn.Parameter(torch.empty(experts, ffn, hidden))
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                nn.init.normal_(w, std=0.02)

    def route(self, probs: torch.Tensor, capacity: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dispatch and combine tensors (G, T, E, C) and the first choices' one-hot mask
        (G, T, E) of router probabilities ``probs`` (G, T, E). A token picks an expert in one
        round at most, so its slot, whether it is kept and its gate add up over the rounds as
        (G, T, E) tensors; one ``one_hot`` of the slots makes the dispatch tensor."""
        dtype = probs.dtype
        remaining = probs
        filled = slot = kept = gate = first = None
        for _ in range(self.top_k):
            mask = F.one_hot(torch.argmax(remaining, dim=-1), self.experts)  # (G, T, E) int
            pos = torch.cumsum(mask, dim=1) - 1  # the slot in the expert, this round
            taken = mask.sum(dim=1, keepdim=True)  # slots this round takes: (G, 1, E)
            if filled is not None:  # after the slots earlier rounds filled
                pos, taken = pos + filled, taken + filled
            keep = mask * (pos < capacity)
            mask_f = mask.to(dtype)
            chosen = probs * mask_f
            if first is None:
                slot, kept, gate, first = pos * keep, keep, chosen, mask_f
            else:
                slot, kept, gate = slot + pos * keep, kept + keep, gate + chosen
            filled = taken
            remaining = remaining - 2.0 * mask_f  # a chosen expert drops below every other
        assert slot is not None and kept is not None and gate is not None and first is not None
        if self.top_k > 1:  # renormalized over the chosen experts, as Mixtral
            gate = gate / gate.sum(dim=-1, keepdim=True)
        dispatch = F.one_hot(slot, capacity).to(dtype) * kept.to(dtype).unsqueeze(-1)
        return dispatch, dispatch * gate.unsqueeze(-1), first

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output (same shape as ``x``) and its load-balancing loss."""
        b, s, h = x.shape
        g = self.groups
        t = b * s // g
        e = self.experts
        cap = expert_capacity(t, e, self.top_k, self.capacity_pct)
        x = x.reshape(g, t, h)
        probs = F.softmax(self.router(x), dim=-1)
        dispatch, combine, first = self.route(probs, cap)
        xe = torch.einsum("gsec,gsd->egcd", dispatch, x).reshape(e, g * cap, h)
        if self.w3 is not None:
            hidden = F.silu(torch.bmm(xe, self.w1)) * torch.bmm(xe, self.w3)
        else:
            hidden = F.gelu(torch.bmm(xe, self.w1))
        ye = torch.bmm(hidden, self.w2).reshape(e, g, cap, h)
        y = torch.einsum("gsec,egcd->gsd", combine, ye).reshape(b, s, h)
        aux = (first.mean(dim=(0, 1)) * probs.mean(dim=(0, 1))).sum() * e
        return y, aux


class MoEBlock(nn.Module):
    """Pre-norm block: attention and a mixture of experts, both residual; it adds its
    load-balancing loss to the running sum it is given."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, moe: MoE) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.moe = moe

    def forward(self, x: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        y, layer_aux = self.moe(self.ln2(x))
        return x + y, aux + layer_aux


class MoEGPT(nn.Module):
    """GPT with mixture-of-experts blocks; loss = cross-entropy + AUX_WEIGHT · Σ layers' load
    balancing losses."""

    def __init__(self, p: dict[str, int]) -> None:
        super().__init__()
        hidden, self.vocab = p["hidden"], p["vocab"]
        self.tok_emb = nn.Embedding(p["vocab"], hidden)
        self.pos_emb = nn.Parameter(torch.empty(p["seq"], hidden))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList(
            MoEBlock(hidden, p["heads"], p["kv_heads"],
                     MoE(hidden, p["ffn"], p["experts"], p["top_k"], p["capacity"],
                         p["groups"], bool(p["glu"])))
            for _ in range(p["layers"]))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, p["vocab"], bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb
        aux = torch.zeros((), dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x, aux = block(x, aux)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, self.vocab), targets.view(-1)) + AUX_WEIGHT * aux
