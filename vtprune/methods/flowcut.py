"""FlowCut — Tong et al., "Rethinking Redundancy via Information Flow for Efficient Vision-Language Models"
(arXiv 2505.19536), https://github.com/TungChintao/FlowCut (@ a2ecd24; LLaVA in ``flowcut/``, Qwen2-VL in
``FlowCut_Qwen/``).

Training-free, text-free pruning *inside* the vision tower: patch rows are removed between tower blocks, so later
blocks run on fewer rows. Per block of the schedule (``flowcut/modeling_clip_flowcut.py``, ``utils_flowcut.py``):

1. From the block's attention: ``a_cls``, [CLS]'s attention to the patch rows (softmax over all rows, mean over
   heads); ``a_sem``, [CLS]'s value-value affinity ``softmax_k(v_cls . v_k)`` per head (no 1/sqrt(d)), mean over
   heads; ``||v||_1``, the L1 norm of each row's head-averaged value.
2. Layer score ``s = (a_cls / sum a_cls + a_sem / sum a_sem) * ||v||_1`` (``compute_score``).
3. Information flow: the scores accumulate over blocks, ``S = s`` at the first block, then
   ``S = ema * S + (1 - ema) * s`` (``ema = 0.5``) at every block while more than ``keep`` patch rows are alive;
   a pruned row's score leaves with it.
4. With ``R = read - 1 - block`` blocks left before the block whose output is read (``read``: LLaVA's
   ``vision_feature_layer``, the penultimate of 24 for LLaVA-1.5, so the authors' ``select_layer = 22``), rows are
   pruned at every block with ``R % every == 0`` (``every = 2``: blocks 1, 3, ..., 21 of CLIP-L): the amount is
   entropy-adaptive (``adaptive_prune_ratio``), ``round((N - keep) / sqrt(R) * (1 - rho^2))`` with ``N`` the
   patch rows alive and ``rho`` the entropy of ``a_cls`` (normalised) over ``log N``: concentrated [CLS] attention
   prunes more, and so do the last blocks. The top ``max(N - amount, keep)`` rows by ``S`` stay, in raster order.
   At ``R = 0`` everything is cut to exactly ``keep``; the read block then runs on ``keep`` rows.

Budget: ``keep`` counts the patch rows left, i.e. the visual tokens the LLM receives per image (the authors'
``target_num``, their ``T = target_num + 1`` counting [CLS]); the default budget of the authors' entry point is
128 (``flowcut(model, target_num=128)``; the paper also reports 192 and 64). Inside LLaVA-1.5 the LLM itself is
not modified (as the authors'); each kept row's projected feature goes on its patch's placeholder, the others are
dropped before the LLM, and positions are closed up (``positions="renumber"``), as the authors' LLaVA inserts
``target_num`` image tokens contiguously. At ``keep`` = all nothing is pruned: the dense model.

Choices that are ours (the authors' code leaves them open or we deviate):

* Where in the block: vtprune's ViT block forward reduces between a block's attention and its MLP, the authors
  after the MLP. The score reads the attention only and the MLP (with its norm) acts on each row alone, so the same
  rows are kept and the kept rows carry the same states; the pruning block's MLP just runs on fewer rows.
* Attention: the block runs SDPA; the [CLS] row and the value affinities are recomputed from the block's own
  queries, keys and values in float32 (the authors patch CLIP's attention to eager in the model's dtype).
* The read block comes from the model instead of ``len(layers) - 2``: LLaVA's ``vision_feature_layer`` (the same
  block for LLaVA-1.5's default -2), a bare ViT's last block (timm / open_clip / transformers CLIP, which the
  authors do not cover); pruning ends one block before it, as theirs does.
* Entropy with ``0 log 0 = 0`` (``torch.xlogy``): the authors' ``p * log p`` turns an attention probability that
  underflows to 0 into NaN; otherwise identical. The amount is computed in float32 and rounded half to even, as
  theirs.
* Towers with registers (timm ``reg_tokens``): [CLS] is prefix row 0, every prefix row stays, softmaxes run over
  all rows and are normalised over the patch rows (the authors' towers have [CLS] only). A tower without [CLS]
  is refused.
* Batches: the rows of one tower call are one tensor, so every image encoded in the call prunes the same amount
  at each block, the largest of their adaptive amounts (the authors' batched rule, ``r.max(0)``); the ranking and
  the final ``keep`` are per image, but an image's intermediate steps can depend on the images encoded with it
  (LLaVA encodes all images of a forward in one call; the authors evaluate one image at a time).
* ``ema`` and ``every`` are options (hard-coded 0.5 and 2 by the authors). The authors' ``all_keep_indices``
  bookkeeping (off by one, unused for selection) is not reproduced: vtprune tracks each row's patch itself.
* ``vision_feature_select_strategy="full"``: [CLS] reaches the LLM as a structural token, not counted in ``keep``
  (the authors' ``cls_patch`` counts it in ``target_num``).

Families: LLaVA-1.5 (its CLIP tower, through the ViT reduction path ``evit`` and ``tome`` use) and bare CLIP /
timm / open_clip ViTs with [CLS]. Not served, each raising a clear ValueError: LLaVA-NeXT, where the authors prune
each view to ``keep / 2 + 1`` rows and then the whole image again to ``keep`` at LLM layer 1 (last instruction
token's query/value relation + semantic score): vtprune's tower reduction places the rows of LLaVA-1.5's single
view only (LLaVA-NeXT packs and unpads its views onto a crop grid) and a tower method's LLM side is one pre-LLM
stage; Qwen2-VL (the authors' ``FlowCut_Qwen``: a mean-query score in the windowed, [CLS]-less tower, the merger
fed groups of 4 surviving patches, LLM layer 1 again) has no ViT reduction path in vtprune; every other family's
tower has no [CLS] (SigLIP, Pixtral) or is not reducible here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.registry import POSITION_CONVENTIONS, register_method
from vtprune.core.vit import ReduceContext, Reduced, ViTInfo, ViTMethod
from vtprune.kernels import gather_tokens

AUTHORS_EMA = 0.5  # weight of the scores accumulated so far (``0.5*cumulative_scores + 0.5*scores``)
AUTHORS_EVERY = 2  # prune where the blocks left before the read block are even (``if not rpl % 2``)
STATE_KEY = "flowcut_scores"  # the accumulated scores of the alive patch rows in ReduceContext.state


def flow_scores(queries: Tensor, keys: Tensor, values: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """One block's FlowCut score of every patch row, and [CLS]'s head-averaged attention to them, both
    ``[B, N]`` float32 (``N`` = rows - ``prefix``), from the block's queries, keys and values ``[B, H, rows, d]``
    ([CLS] = row 0; the authors' ``CLIPAttention_forward`` + ``compute_score``)."""
    q, k, v = queries.float(), keys.float(), values.float()
    # [CLS] row of the attention, softmax over every key (prefix rows included), mean over heads
    logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * q.shape[-1] ** -0.5
    relation = logits.softmax(-1).mean(1)[:, prefix:]
    # value-value affinity of [CLS], unscaled as the authors' bmm(cls_value, value_states^T)
    semantic = (v[:, :, :1] @ v.transpose(-2, -1)).squeeze(2).softmax(-1).mean(1)[:, prefix:]
    norm = v.mean(1)[:, prefix:].abs().sum(-1)  # L1 norm of the head-averaged value
    score = (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * norm
    return score, relation


def adaptive_prune_count(cls_attention: Tensor, remaining: int, keep: int) -> int:
    """Rows to prune now (the authors' ``adaptive_prune_ratio``): ``round((N - keep) / sqrt(remaining) *
    (1 - rho^2))`` with ``rho`` the entropy of the normalised ``cls_attention`` ``[B, N]`` over ``log N``, the
    largest over the batch. ``remaining`` >= 1 blocks are left before the read block."""
    n = cls_attention.shape[-1]
    p = cls_attention.float() / cls_attention.float().sum(-1, keepdim=True)
    entropy = -torch.xlogy(p, p).sum(-1)  # 0 log 0 = 0 (the authors' p * log p gives NaN there)
    ratio = entropy / torch.log(torch.tensor(float(n)))
    amount = (n - keep) / remaining**0.5 * (1 - ratio**2)  # float32, as theirs
    return int(amount.max().round())


@register_method
@dataclass
class FlowCut(ViTMethod):
    """[CLS] relation + value affinity x value norm, accumulated over tower blocks (EMA ``ema``); entropy-adaptive
    pruning at every ``every``-th block, down to ``keep`` one block before the layer read."""

    name = "flowcut"
    summary = "inside the vision tower: [CLS] attention + value affinity x value norm, EMA over blocks, adaptive cuts"
    paper = "Tong et al., arXiv 2505.19536 (TungChintao/FlowCut)"
    ema: float = AUTHORS_EMA
    every: int = AUTHORS_EVERY
    positions: str = "renumber"  # inside a VLM: kept tokens' positions closed up, as the authors' LLaVA

    def __post_init__(self) -> None:
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise ValueError(f"flowcut: ema must be a number in [0, 1) (the authors' 0.5), got {self.ema!r}")
        if isinstance(self.every, bool) or not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"flowcut: every must be an int >= 1 (the authors' 2), got {self.every!r}")
        if self.positions not in POSITION_CONVENTIONS:
            raise ValueError(f"flowcut: positions must be one of {POSITION_CONVENTIONS}, got {self.positions!r}")

    def schedule(self, info: ViTInfo, keep: int) -> dict[int, int]:
        # every block before the read one scores (and may prune) while more than keep rows are alive
        if info.prefix < 1:
            raise ValueError("flowcut ranks patch rows by the [CLS] token's attention; this tower has no [CLS] token")
        if info.depth < 2:
            raise ValueError(
                "flowcut prunes in the blocks before the one whose output is read; this tower has only "
                f"{info.depth} block up to that layer"
            )
        return {block: keep for block in range(info.depth - 1)}

    def reduce(self, ctx: ReduceContext) -> Reduced:
        if ctx.values is None or ctx.info is None:
            raise RuntimeError("flowcut needs the block's values and the tower's depth in its ReduceContext")
        p = ctx.prefix
        scores, relation = flow_scores(ctx.queries, ctx.keys, ctx.values, p)
        previous = ctx.state.get(STATE_KEY)
        accumulated = scores if previous is None else self.ema * previous + (1 - self.ema) * scores
        remaining = ctx.info.depth - 2 - ctx.block  # the authors' rpl = select_layer - idx - 1
        if remaining > 0 and remaining % self.every:  # a scoring-only block
            ctx.state[STATE_KEY] = accumulated
            return Reduced(ctx.x, ctx.sizes, ctx.origin)
        alive = accumulated.shape[1]
        kept = ctx.target
        if remaining > 0:
            kept = max(alive - adaptive_prune_count(relation, remaining, ctx.target), ctx.target)
        top = accumulated.topk(kept, dim=-1).indices.sort(-1).values
        ctx.state[STATE_KEY] = accumulated.gather(1, top)
        x = torch.cat([ctx.x[:, :p], gather_tokens(ctx.x[:, p:], top)], 1)
        sizes = torch.cat([ctx.sizes[:, :p], ctx.sizes[:, p:].gather(1, top)], 1)
        origin = torch.cat([ctx.origin[:, :p], ctx.origin[:, p:].gather(1, top)], 1)
        return Reduced(x, sizes, origin)
