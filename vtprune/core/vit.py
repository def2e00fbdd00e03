"""Token reduction inside plain vision transformers (timm ``VisionTransformer``, open_clip visual towers).

The shape follows ToMe's patch: every block of the tower gets vtprune's own block forward (attention computed from
the block's own weights with SDPA, so q/k are at hand), and between a block's attention and its MLP a method may
reduce the tokens. Each row carries a size (how many patches it stands for); attention adds ``log(size)`` to the
keys' logits ("proportional attention"), so a merged row weighs what its parts weighed. Prefix tokens ([CLS],
registers) are never reduced.

A ViT adapter says where a block's pieces are; a ViT method says how to reduce; they meet here and never import
each other. ``vtprune.wrap`` sends towers here; the LLM-side engine is not involved.
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtprune.core.budget import Keep, tokens_to_keep
from vtprune.core.registry import make_method

WRAPPED_VIT = "_vtprune_vit_handle"


@dataclass
class ViTInfo:
    """What a ViT method may know about the tower."""

    family: str
    depth: int
    patches: int  # patch tokens entering the first block
    prefix: int  # [CLS] / register tokens in front of them
    heads: int


@dataclass
class ReduceContext:
    """What a method sees between a block's attention and its MLP (all ``[B, ...]`` for the tokens now alive)."""

    block: int
    x: Tensor  # [B, N, C] hidden states after the attention residual
    keys: Tensor  # [B, H, N, d] the block's keys
    queries: Tensor  # [B, H, N, d]
    sizes: Tensor  # [B, N] patches each row stands for (prefix rows: 1)
    origin: Tensor  # [B, N] long: each row's representative among the rows entering the first block
    prefix: int
    # patch rows (excluding prefix) to leave after this block; a method that sizes its own steps (FlowCut) may
    # leave more at a block, never fewer, and reaches it at the schedule's last block
    target: int
    proportional: bool = False  # the block's attention added log(size) to the keys
    values: Tensor | None = None  # [B, H, N, d] the block's values
    info: ViTInfo | None = None  # the tower (``info.depth``: blocks the schedule spans)
    # the method's own scratch for this forward (e.g. scores accumulated over blocks), empty at the first block
    state: dict[str, Any] = field(default_factory=dict)

    def cls_attention(self) -> Tensor:
        """Head-averaged attention of the first prefix token ([CLS]) to the patch rows, ``[B, N - prefix]``,
        with proportional attention as the block computed it."""
        scale = self.queries.shape[-1] ** -0.5
        logits = (self.queries[:, :, :1] @ self.keys.transpose(-2, -1)).squeeze(2) * scale
        if self.proportional:
            logits = logits + self.sizes.log()[:, None, :]
        return logits.softmax(-1).mean(1)[:, self.prefix :]


class Reduced(NamedTuple):
    """A reduction's result: ``prefix + target`` rows, their sizes, and each row's representative original row
    (unique within an image: a kept row's own, a merged row's destination, a fused row's first member) — what a
    VLM uses to place the row in its prompt."""

    x: Tensor
    sizes: Tensor
    origin: Tensor


class ViTMethod:
    """Base of a ViT token-reduction method: a config dataclass with ``schedule`` and ``reduce``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "vit"
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def schedule(self, info: ViTInfo, keep: int) -> dict[int, int]:
        """{block index: patch rows left after that block}; ends at ``keep``."""
        raise NotImplementedError

    def reduce(self, ctx: ReduceContext) -> Reduced:
        """The new rows (``ctx.prefix + ctx.target`` of them, or more where the method sizes its own steps), their
        sizes and representatives."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


class ViTAdapter:
    """Where one library's ViT keeps its blocks and their pieces."""

    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module, feature_blocks: int | None = None) -> None:
        """``feature_blocks``: how many blocks feed what the caller reads (a VLM reading an inner layer); the
        reduction schedule ends there. None: all."""
        self.model = model
        self.feature_blocks = feature_blocks

    def depth(self) -> int:
        """Blocks the reduction schedule spans."""
        depth = len(self.blocks())
        if self.feature_blocks is not None and not 1 <= self.feature_blocks <= depth:
            raise ValueError(f"feature_blocks must lie in [1, {depth}], got {self.feature_blocks}")
        return self.feature_blocks or depth

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def info(self) -> ViTInfo:
        raise NotImplementedError

    def check(self) -> None:
        """Raise a clear error for block variants the generic forward does not reproduce."""

    def qkv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, H, N, d]`` queries, keys, values of ``block`` for its normalised input."""
        raise NotImplementedError

    def attention_out(self, block: nn.Module, heads_out: Tensor) -> Tensor:
        """The attention's output projection applied to ``[B, N, C]``."""
        raise NotImplementedError

    def pieces(self, block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]:
        """(norm before attention, layer scale after attention, norm before MLP, MLP, layer scale after MLP)."""
        raise NotImplementedError


@dataclass
class ViTRecord:
    """The last forward: rows (prefix included) entering each block, and after the last reducing block each row's
    representative among the rows entering the first block (``[B, rows]``; None before any forward)."""

    seq_lens: list[int]
    origin: Tensor | None = None


class ViTPruning:
    """Handle of a wrapped ViT: ``config()``, ``last`` (rows per block), ``unwrap()``; a context manager too."""

    def __init__(self, model: nn.Module, adapter: ViTAdapter, method: ViTMethod, keep: Keep) -> None:
        self.model, self.adapter, self.method, self.keep = model, adapter, method, keep
        self.info = adapter.info()
        self.final = tokens_to_keep(keep, self.info.patches)
        self.plan = method.schedule(self.info, self.final)
        self.last = ViTRecord([])
        self._sizes: Tensor | None = None
        self._state: dict[str, Any] = {}  # ReduceContext.state of the forward in flight
        self._blocks = adapter.blocks()
        for index, block in enumerate(self._blocks):
            block.forward = types.MethodType(_block_forward(self, index), block)
        setattr(model, WRAPPED_VIT, self)

    def config(self) -> dict[str, Any]:
        return {"method": self.method.name, **self.method.options(), "keep": self.keep, "family": self.adapter.family}

    def unwrap(self) -> None:
        for block in self._blocks:
            block.__dict__.pop("forward", None)
        if getattr(self.model, WRAPPED_VIT, None) is self:
            delattr(self.model, WRAPPED_VIT)

    def __enter__(self) -> ViTPruning:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwrap()


def _block_forward(handle: ViTPruning, index: int) -> Any:
    adapter, method = handle.adapter, handle.method
    prefix = handle.info.prefix

    def forward(block: nn.Module, x: Tensor, *args: Any, attn_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        if attn_mask is not None or any(a is not None for a in args) or kwargs.get("is_causal"):
            raise ValueError("vtprune's ViT pruning runs unmasked self-attention only (got an attention mask)")
        if index == 0:
            handle._sizes = x.new_ones(x.shape[:2], dtype=torch.float32)
            handle.last = ViTRecord([], torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1))
            handle._state = {}
        sizes = handle._sizes
        handle.last.seq_lens.append(x.shape[1])
        norm1, scale1, norm2, mlp, scale2 = adapter.pieces(block)
        q, k, v = adapter.qkv(block, norm1(x))
        proportional = getattr(method, "proportional", False) and bool((sizes != 1).any())
        bias = sizes.log().to(q.dtype)[:, None, None, :] if proportional else None
        heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + _drop(block, 1)(scale1(adapter.attention_out(block, heads_out.transpose(1, 2).flatten(2))))
        target = handle.plan.get(index)
        if target is not None and target < x.shape[1] - prefix:
            ctx = ReduceContext(
                index, x, k, q, sizes, handle.last.origin, prefix, target, proportional, v, handle.info, handle._state
            )
            x, sizes, origin = method.reduce(ctx)
            if origin.shape != x.shape[:2]:
                raise RuntimeError(f"{method.name}: reduce returned {x.shape[1]} rows but {origin.shape[1]} origins")
            handle._sizes, handle.last.origin = sizes, origin
        return x + _drop(block, 2)(scale2(mlp(norm2(x))))

    return forward


def _drop(block: nn.Module, which: int) -> nn.Module:
    return getattr(block, f"drop_path{which}", None) or nn.Identity()


def even_schedule(
    depth: int, start: int, total: int, keep: int, *, cap: Callable[[int], int] | None = None
) -> dict[int, int]:
    """Remove ``total - keep`` rows in equal steps over blocks ``start .. depth-1`` (ToMe's constant r); ``cap``
    bounds one step given the rows alive (bipartite merging halves at most), and steps move earlier where a later
    block could not take its share."""
    bound = cap or (lambda alive: alive)

    def fewest_after(alive: int, blocks: int) -> int:
        for _ in range(blocks):
            alive -= bound(alive)
        return alive

    blocks = list(range(start, depth))
    plan, alive = {}, total
    for position, block in enumerate(blocks):
        left = len(blocks) - position
        step = min(math.ceil((alive - keep) / left), bound(alive))
        while step < bound(alive) and fewest_after(alive - step, left - 1) > keep:
            step += 1
        alive -= max(0, step)
        plan[block] = alive
    if alive != keep:
        raise ValueError(f"keep={keep} cannot be reached from {total} tokens in {len(blocks)} blocks")
    return plan


def wrap_vit(model: nn.Module, adapter: ViTAdapter, method: str | ViTMethod, keep: Keep, **options: Any) -> ViTPruning:
    """``vtprune.wrap`` for a vision transformer (called by it; see there)."""
    existing = getattr(model, WRAPPED_VIT, None)
    if existing is not None:
        raise ValueError(f"this model is already wrapped by vtprune ({existing.method.name}, keep={existing.keep}); "
                         "call .unwrap() on that handle before wrapping it again")  # fmt: skip
    adapter.check()
    config = make_method(method, kind="vit", **options)
    return ViTPruning(model, adapter, config, keep)
