"""DToP: easy tokens exit a plain-ViT segmenter early.

Tang et al., "Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation", ICCV 2023
(arXiv 2308.01045). Code: https://github.com/zbwxp/Dynamic-Token-Pruning

Unlike the other methods this one is trained: the backbone (a timm ``VisionTransformer``) is split into stages, and
a SegViT/ATM-style head at the end of each stage grades every token still running. Per image and token the head
gives per-class scores ``pred[c, t] = sum_q softmax(class_logits[q])[c] * sigmoid(mask_logits[q, t])``; a token
whose best score is above ``thresh`` (strictly, as the authors compare; so 1.0 lets nothing exit) is "easy" and
exits: it leaves every later block (neither query nor key) and its mask logits stay as its exit stage wrote them.
Per class, the ``keep_per_class`` (authors: 5) most confident easy tokens stay anyway, to keep context for the rest.
The final map combines the last head's class probabilities with each token's mask logits from the stage it left
(the authors' ``canvas``). Batches run together: surviving tokens are packed to the front of each row (through
``vtprune.kernels.gather_tokens``) and the padding is masked out of timm's own (fused / SDPA) attention.

Differences from the authors' code, on purpose: the head's mask logits are a learned query-token similarity (ATM
reads them off the decoder's cross-attention map) and it has one decoder layer by default (ATM: 3); the authors
run a per-image loop where we pad and mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtprune.core.registry import register_method
from vtprune.kernels import gather_tokens

PAPER = "Tang et al., ICCV 2023 (arXiv 2308.01045)"
AUTHORS_KEEP_PER_CLASS = 5
AUTHORS_THRESH = 0.9  # ViT-B on ADE20K (ViT-L configs use 0.95)


def early_exit(
    scores: Tensor, candidates: Tensor, thresh: float, keep_per_class: int = AUTHORS_KEEP_PER_CLASS
) -> Tensor:
    """Which tokens exit now: ``[B, N]`` bool.

    ``scores [B, C, N]`` are per-class token scores in [0, 1]; ``candidates [B, N]`` marks the tokens allowed to
    exit (alive patch tokens). A candidate whose best score is above ``thresh`` is easy; among the easy tokens of
    each predicted class the ``keep_per_class`` most confident stay.
    """
    if scores.ndim != 3 or candidates.shape != (scores.shape[0], scores.shape[2]):
        raise ValueError(f"early_exit: scores must be [B, C, N] and candidates [B, N]; got {tuple(scores.shape)} "
                         f"and {tuple(candidates.shape)}")  # fmt: skip
    if keep_per_class < 0:
        raise ValueError(f"keep_per_class must be >= 0, got {keep_per_class}")
    confidence, label = scores.max(1)
    easy = candidates & (confidence > thresh)
    if keep_per_class == 0 or not bool(easy.any()):
        return easy
    classes = torch.arange(scores.shape[1], device=scores.device)
    of_class = easy[:, None, :] & (label[:, None, :] == classes[None, :, None])  # [B, C, N]
    ranked = torch.where(of_class, confidence[:, None, :], torch.full_like(confidence[:, None, :], -1.0))
    top, where = ranked.topk(min(keep_per_class, scores.shape[2]), dim=-1)
    # scatter_add: a non-easy slot may point at the same token as a real one; adding zeros cannot undo it
    stays = torch.zeros_like(confidence).scatter_add_(1, where.flatten(1), (top >= 0).flatten(1).to(confidence.dtype))
    return easy & (stays == 0)


class ClassQueryHead(nn.Module):
    """SegViT's ATM head, small: one learned query per class cross-attends to the tokens; mask logits are
    query-token similarities, class logits (``classes + 1``, the last = no object) say whether a query's class is
    in the image."""

    def __init__(self, width: int, classes: int, dim: int | None = None, layers: int = 1, heads: int = 4) -> None:
        super().__init__()
        dim = dim or width
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)
        self.queries = nn.Parameter(torch.randn(classes, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.query_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, classes + 1)
        self.mask_query = nn.Linear(dim, dim)
        self.mask_key = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ignore: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, N, width]`` (``ignore [B, N]``: rows that are padding or not patches) -> class logits
        ``[B, Q, classes + 1]`` and mask logits ``[B, Q, N]``."""
        memory = self.proj(self.norm(x))
        # repeat, not expand: a no-grad view of a parameter still claims requires_grad, which FlopCounterMode trips on
        queries = self.queries.repeat(x.shape[0], 1, 1)
        queries = self.decoder(queries, memory, memory_key_padding_mask=ignore)
        queries = self.query_norm(queries)
        masks = self.mask_query(queries) @ self.mask_key(memory).transpose(1, 2) * memory.shape[-1] ** -0.5
        return self.class_embed(queries), masks


def class_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """SegViT's semantic inference: ``[B, Q, C+1]`` and ``[B, Q, N]`` -> per-class token scores ``[B, C, N]``."""
    return torch.einsum("bqc,bqn->bcn", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


@dataclass
class DToPOutput:
    """One forward of :class:`DToPSegmenter`."""

    scores: Tensor  # [B, C, h, w] final per-class token scores
    mask_logits: Tensor  # [B, Q, h, w] each token's mask logits, from the stage it exited at (or the last)
    class_logits: Tensor  # [B, Q, C+1] the last head's
    exit_block: Tensor  # [B, h*w] block after which the token stopped (depth - 1: it ran them all)
    rows: Tensor  # [B, depth] rows (prefix included) each block ran on, per image

    def labels(self, size: tuple[int, int] | None = None) -> Tensor:
        """``[B, H, W]`` class map, scores bilinearly upsampled to ``size`` first (the image size, usually)."""
        if size is None:
            return self.scores.argmax(1)
        return F.interpolate(self.scores, size=size, mode="bilinear", align_corners=False).argmax(1)


@register_method
class DToPSegmenter(nn.Module):
    """A timm ``VisionTransformer`` with a :class:`ClassQueryHead` after each stage, run with DToP's early exit.

    ``stages``: 0-based indices of the blocks that end a stage (the last must be the last block); default: thirds
    of the depth, as the authors' ViT-L configs (8 / 16 / 24 of 24).
    """

    # listed with the methods (kind "trained"); it is a model with trained heads, not something vtprune.wrap applies
    name = "dtop"
    kind = "trained"
    summary = "trained early exit of confident tokens in a ViT segmenter [DToPSegmenter; vtprune dtop]"
    paper = PAPER
    usage = "DToP needs trained stage heads: it is vtprune.methods.dtop.DToPSegmenter, not a wrap"
    defaults = (
        f"thresh=1.0 (dense; the authors run {AUTHORS_THRESH} on ViT-B, 0.95 on ViT-L), "
        f"keep_per_class={AUTHORS_KEEP_PER_CLASS}"
    )

    def __init__(
        self, backbone: nn.Module, classes: int, stages: Sequence[int] | None = None, *, head_layers: int = 1,
        head_heads: int = 4, keep_per_class: int = AUTHORS_KEEP_PER_CLASS,
    ) -> None:  # fmt: skip
        super().__init__()
        if type(backbone).__name__ != "VisionTransformer" or not type(backbone).__module__.startswith("timm."):
            kind = f"{type(backbone).__module__}.{type(backbone).__name__}"
            raise TypeError(f"DToP runs on a timm VisionTransformer, got {kind}")
        if getattr(backbone, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size backbones are not supported: the token grid must be fixed")
        depth = len(backbone.blocks)
        stages = list(stages) if stages is not None else [depth // 3 - 1, 2 * depth // 3 - 1, depth - 1]
        if sorted(set(stages)) != stages or not stages or stages[0] < 0 or stages[-1] != depth - 1:
            raise ValueError(f"stages must be increasing block indices in [0, {depth - 1}] ending with {depth - 1} "
                             f"(the last block), got {stages}")  # fmt: skip
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        if keep_per_class < 1:  # with none kept, an image could lose every token before its last stage
            raise ValueError(f"keep_per_class must be >= 1 for a segmenter, got {keep_per_class}")
        self.backbone, self.classes, self.stages, self.keep_per_class = backbone, classes, stages, keep_per_class
        width = backbone.embed_dim
        self.heads = nn.ModuleList(ClassQueryHead(width, classes, layers=head_layers, heads=head_heads) for _ in stages)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)  # type: ignore[return-value]

    def embed(self, images: Tensor) -> Tensor:
        """Rows entering the first block (timm's ``forward_features`` up to its blocks)."""
        backbone = self.backbone
        x = backbone._pos_embed(backbone.patch_embed(images))
        return backbone.norm_pre(backbone.patch_drop(x))

    def stage_outputs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Dense forward (no exits; what training uses): each stage head's ``(class_logits, mask_logits)`` over all
        patch tokens."""
        x, prefix, outputs = self.embed(images), self.backbone.num_prefix_tokens, []
        heads = dict(zip(self.stages, self.heads))
        for index, block in enumerate(self.backbone.blocks):
            x = block(x)
            if index in heads:
                outputs.append(heads[index](x[:, prefix:]))
        return outputs

    def forward(self, images: Tensor, thresh: float = 1.0) -> DToPOutput:
        """Segment ``images [B, 3, H, W]``; tokens whose best score is above ``thresh`` after a stage exit."""
        if not 0.0 <= thresh <= 1.0:
            raise ValueError(f"thresh must lie in [0, 1] (1 = no token exits), got {thresh}")
        x = self.embed(images)
        batch, rows, _ = x.shape
        prefix = self.backbone.num_prefix_tokens
        patches = rows - prefix
        # positions[b, j]: which original row alive row j is (-1: padding)
        positions = torch.arange(rows, device=x.device).expand(batch, rows)
        canvas = x.new_zeros(batch, self.classes, patches + 1)  # last column catches prefix / padding writes
        exit_block = torch.full((batch, patches + 1), len(self.backbone.blocks) - 1, dtype=torch.long, device=x.device)
        counts, heads, last = [], dict(zip(self.stages, self.heads)), self.stages[-1]
        class_logits = x.new_zeros(0)
        for index, block in enumerate(self.backbone.blocks):
            valid = positions >= 0
            padded = not bool(valid.all())
            x = block(x, attn_mask=valid[:, None, None, :]) if padded else block(x)
            counts.append(valid.sum(1))
            if index not in heads:
                continue
            is_patch = valid & (positions >= prefix)
            class_logits, mask_logits = heads[index](x, ignore=~is_patch)
            slot = torch.where(is_patch, positions - prefix, patches)
            canvas.scatter_(2, slot[:, None, :].expand(-1, self.classes, -1), mask_logits)
            if index == last or thresh >= 1.0:
                continue
            leaving = early_exit(class_scores(class_logits, mask_logits), is_patch, thresh, self.keep_per_class)
            if bool(leaving.any()):
                exit_block.scatter_(1, slot.masked_fill(~leaving, patches), index)
                x, positions = _pack(x, positions, valid & ~leaving)
        mask_canvas = canvas[..., :patches]
        scores = class_scores(class_logits, mask_canvas)
        height, width = self.grid
        return DToPOutput(
            scores=scores.unflatten(2, (height, width)),
            mask_logits=mask_canvas.unflatten(2, (height, width)),
            class_logits=class_logits,
            exit_block=exit_block[:, :patches],
            rows=torch.stack(counts, 1),
        )

    def config(self) -> dict[str, Any]:
        return {"classes": self.classes, "stages": self.stages, "keep_per_class": self.keep_per_class,
                "head_layers": len(self.heads[0].decoder.layers)}  # fmt: skip


def _pack(x: Tensor, positions: Tensor, staying: Tensor) -> tuple[Tensor, Tensor]:
    """Move each image's staying rows to the front (order kept), drop the columns no image needs."""
    width = int(staying.sum(1).max())
    order = torch.sort((~staying).to(torch.int8), dim=1, stable=True).indices[:, :width]
    kept = staying.gather(1, order)
    index = torch.where(kept, order, -1)
    return gather_tokens(x, index, check=False), torch.where(kept, positions.gather(1, order), -1)
