"""Where the visual tokens are: the static structure of each image and the token layout of one forward.

A *visual item* is the unit a budget applies to: one image (LLaVA, LLaVA-NeXT, Qwen), one whole video (the
default, ``budget_unit="video"``: its ``frames`` say where each frame's tokens lie) or one frame of a video
(``budget_unit="frame"``). A *layout* describes the sequence as it enters a range of decoder layers: for every
slot, which original token it holds, whether it is padding, and which item token it is. Pruning turns one layout
into a shorter one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class GridPart:
    """A rectangular patch grid inside an item: tokens ``offset + r * row_stride + c`` for r < height, c < width."""

    offset: int
    height: int
    width: int
    row_stride: int

    def token_indices(self, device: torch.device | None = None) -> Tensor:
        rows = torch.arange(self.height, device=device)[:, None] * self.row_stride
        return (self.offset + rows + torch.arange(self.width, device=device)[None, :]).flatten()


@dataclass
class VisualItem:
    """One image, video or video frame: a run of visual tokens that a budget applies to.

    ``structural`` marks tokens that are always kept and not counted in the budget (LLaVA-NeXT's row
    separators), so a budget of k keeps k patch tokens plus the separators. ``frames`` holds, for a whole video of
    several frames, each frame's token count in order (they sum to ``num_tokens``); empty for an image, a single
    frame and a one-frame video.
    """

    index: int
    sample: int
    modality: str
    num_tokens: int
    visual_offset: int
    grids: tuple[GridPart, ...] = ()
    structural: Tensor | None = None
    frames: tuple[int, ...] = ()

    @property
    def num_frames(self) -> int:
        return max(1, len(self.frames))

    def frame_of_tokens(self, device: torch.device | None = None) -> Tensor:
        """The frame (0-based) of each of the item's tokens; all 0 for an item that is not a several-frame video."""
        if not self.frames:
            return torch.zeros(self.num_tokens, dtype=torch.long, device=device)
        sizes = torch.tensor(self.frames, device=device)
        return torch.repeat_interleave(torch.arange(len(self.frames), device=device), sizes)

    @property
    def num_selectable(self) -> int:
        if self.structural is None:
            return self.num_tokens
        return self.num_tokens - int(self.structural.sum())

    def selectable_mask(self, device: torch.device | None = None) -> Tensor:
        if self.structural is None:
            return torch.ones(self.num_tokens, dtype=torch.bool, device=device)
        return ~self.structural.to(device)


@dataclass
class Layout:
    """The token layout of a batch as it enters decoder layer ``first_layer``.

    All tensors are ``[B, L]`` except ``positions`` (the model's own position ids with the sequence last, e.g.
    ``[B, L]`` for 1-D RoPE or ``[3, B, L]`` for M-RoPE) and ``shift`` (``[B]``: how far this layout's positions
    lag the original numbering, subtracted from positions of tokens decoded later).
    """

    token: Tensor
    valid: Tensor
    item: Tensor
    item_token: Tensor
    positions: Tensor
    shift: Tensor
    first_layer: int
    padding_side: str = "left"
    # Set for layouts made by pruning: the slot of the previous layout each slot came from (-1 = padding).
    source: Tensor | None = field(default=None, repr=False)
    # Where prompt tokens attend bidirectionally (Gemma 3's images, PaliGemma's prefix): each slot's block, tokens
    # of one block seeing each other whatever their order; -1 (or no tensor at all) = causal only.
    blocks: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    @property
    def length(self) -> int:
        return self.token.shape[1]

    @property
    def visual(self) -> Tensor:
        return self.item >= 0

    def lengths(self) -> list[int]:
        """Real (non-padding) tokens per sample."""
        return self.valid.sum(1).tolist()

    def compact(self, keep: Tensor, *, renumber: bool, first_layer: int) -> Layout:
        """The layout holding only the slots where ``keep`` is True, re-padded on the same side.

        With ``renumber`` the positions close the gaps left by dropped tokens (each kept token moves down by the
        number of real tokens dropped before it), as PyramidDrop / TransPrune and pre-LLM pruners do; otherwise
        every kept token keeps its original position, as FastV and EntropyPrune do.
        """
        keep = keep & self.valid
        counts = keep.sum(1)
        new_len = int(counts.max()) if counts.numel() else 0
        rank = keep.long().cumsum(1) - 1
        if self.padding_side == "left":
            rank = rank + (new_len - counts)[:, None]
        source = torch.full((self.batch_size, new_len), -1, dtype=torch.long, device=keep.device)
        rows, cols = keep.nonzero(as_tuple=True)
        source[rows, rank[rows, cols]] = cols
        pad = source < 0
        index = source.clamp(min=0)

        def take(t: Tensor, fill: int) -> Tensor:
            return t.gather(1, index).masked_fill(pad, fill)

        dropped = self.valid & ~keep
        positions = self.positions
        if renumber:
            positions = positions - dropped.long().cumsum(1).to(positions.dtype)
        positions = positions.gather(-1, index.expand(*positions.shape[:-2], -1, -1))
        shift = self.shift + dropped.sum(1) if renumber else self.shift
        return Layout(
            token=take(self.token, -1),
            valid=~pad,
            item=take(self.item, -1),
            item_token=take(self.item_token, -1),
            positions=positions,
            shift=shift,
            first_layer=first_layer,
            padding_side=self.padding_side,
            source=source,
            blocks=take(self.blocks, -1) if self.blocks is not None else None,
        )


def padding_side_of(attention_mask: Tensor | None) -> str:
    """'right' when some sequence ends in padding, else 'left' (also for unpadded batches)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return "left"
    return "right" if bool((attention_mask[:, -1] == 0).any()) else "left"
