"""The prune context: what a method sees at one pruning point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage


@dataclass
class ItemView:
    """One image (or frame) as it stands at this pruning point.

    ``tokens`` are the item's surviving tokens in its original numbering (ascending), ``slots`` where they sit in
    row ``item.sample`` of the current layout. The rest are per current token, where the stage asked for them:
    ``features`` the projected features the LLM received (always), ``encoder_features`` features before the projector,
    ``cls_attention`` ``[len(stage.vision_layers), n]`` head-averaged [CLS] -> token attention of those tower layers
    (each token scored by its own view's [CLS]), ``received_attention`` ``[len(stage.vision_received), n]`` the
    head-averaged attention each token receives from every token of its view in those tower layers, ``vision_maps``
    ``[len(stage.vision_maps), n]`` and ``pixel_maps`` ``[len(stage.pixel_maps), n]`` the values the stage's tower-
    and pixel-map functions gave each token's rows (see :class:`Stage`), ``encoder_keys``
    the head-averaged keys of the last of the ``vision_layers``,
    ``cls_features`` each view's [CLS] feature before the projector (by view id), ``groups`` the view (crop) of each
    token for per-crop budgets; ``replacement`` / ``replacement_grid`` the features and (rows, cols) of the image
    re-encoded at a lower resolution (``Stage.resample``); ``tower_tokens`` the tokens (original numbering, ascending)
    the rows of a tower that reduced its own tokens stand on (``Stage.tower``; None for an image it did not encode).
    """

    item: VisualItem
    order: int
    tokens: Tensor
    slots: Tensor
    selectable: Tensor
    budget: int
    features: Tensor | None = None
    encoder_features: Tensor | None = None
    cls_attention: Tensor | None = None
    received_attention: Tensor | None = None
    vision_maps: Tensor | None = None
    pixel_maps: Tensor | None = None
    encoder_keys: Tensor | None = None
    cls_features: dict[int, Tensor] | None = None
    replacement: Tensor | None = None
    replacement_grid: tuple[int, int] | None = None
    tower_tokens: Tensor | None = None
    groups: Tensor | None = None
    group_budgets: dict[int, int] | None = None
    # the tokens the item keeps after the schedule's last stage (e.g. a floor for a stage that merges by similarity)
    final_budget: int | None = None

    @property
    def sample(self) -> int:
        return self.item.sample

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def video_frames(self, method: str, compares: str) -> tuple[Tensor, int]:
        """A video's selectable tokens (indices into its current tokens, frame after frame) and how many each frame
        holds, for methods that compare frames place by place; raises when the frames hold different counts (an
        earlier stage pruned the video). ``compares`` says what ``method`` does, for the message."""
        candidates = self.selectable.nonzero().squeeze(1)
        frame = self.item.frame_of_tokens(self.tokens.device)[self.tokens[candidates]]
        counts = torch.bincount(frame, minlength=self.item.num_frames)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"{method} {compares}, but this video's frames hold {counts.tolist()} tokens here; {method} must see "
                "every token of the video (put it first)"
            )
        return candidates, int(counts[0])

    def budget_groups(self) -> list[tuple[Tensor, int]]:
        """(indices of selectable tokens, how many of them to keep) per budget group: the whole item, or each view."""
        if self.group_budgets is None:
            return [(self.selectable.nonzero().squeeze(1), self.budget)]
        return [
            ((self.selectable & (self.groups == group)).nonzero().squeeze(1), budget)
            for group, budget in self.group_budgets.items()
        ]


@dataclass
class Signals:
    """Where a context's model signals come from: the engine fills in what the stage asked for (attention rows
    recomputed from a layer's Q/K, query states after RoPE); a test passes hand-made callables."""

    attention: Callable[[], Tensor] | None = None
    attention_of: Callable[[Tensor, Tensor], Tensor] | None = None
    attention_rows: Callable[[Tensor, Tensor, bool], Tensor] | None = None
    query_states: Callable[[], Tensor] | None = None
    key_states: Callable[[], Tensor] | None = None


@dataclass
class PruneContext:
    """Everything a method may read at one stage.

    ``hidden_states`` is the input of decoder layer ``stage.layer`` (in-LLM stages). ``attention()`` returns the
    head-averaged attention probabilities of the stage's query token(s) to every slot of ``layout``, ``[B, L]``
    (averaged over the query rows too), recomputed from layer ``stage.attention_from``'s queries and keys.
    ``query_states()`` returns layer ``stage.states_from``'s query states after RoPE, ``[B, L, heads, head_dim]``,
    ``key_states()`` its key states after its k-norm and RoPE (what its KV cache holds), ``[B, L, kv_heads, head_dim]``.
    ``final_norm`` is the language model's last norm (the one before the LM head; in-LLM stages), e.g. for
    similarities in the space the LM head reads.
    ``instruction_embeddings[b]`` holds the LLM input embeddings of sample b's instruction tokens (the text after
    its last image) and ``instruction_ids[b]`` their token ids; ``embed`` maps token ids to LLM input embeddings and
    ``tokenizer`` is the one passed to ``vtprune.wrap`` (or None). ``state`` is what the method's ``observe()`` wrote.
    At a decode stage (:class:`~vtprune.core.registry.DecodeStage`) ``layout`` is the cached prompt slots of the
    stage's layer, ``attention()`` the attention of the step's newest token over them and ``step`` the decode step;
    only ``items`` (tokens, slots, selectable, budget), ``model`` and ``state`` are set besides.
    ``project(features)`` maps features from before the projector (``ItemView.encoder_features`` rows, or perturbed
    ones) into the LLM's input space, row by row (pre-LLM stages on families with a per-token projector).
    """

    stage: Stage
    model: ModelInfo
    layout: Layout
    items: list[ItemView]
    hidden_states: Tensor | None = None
    state: dict = field(default_factory=dict)
    instruction_ids: list[Tensor] | None = None
    instruction_embeddings: list[Tensor] | None = None
    embed: Callable[[Tensor], Tensor] | None = None
    tokenizer: Any = None
    final_norm: Callable[[Tensor], Tensor] | None = None
    projector: Callable[[Tensor], Tensor] | None = None
    # at a decode stage (Method.decode_score): the decode step (1-based) whose newest token ranks; 0 in prefill
    step: int = 0
    signals: Signals = field(default_factory=Signals, repr=False)
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def _signal(self, name: str, field_name: str) -> Tensor:
        source = getattr(self.signals, name)
        if source is None:
            raise RuntimeError(f"this stage did not request {name}: set Stage.{field_name} in the method's stages()")
        if name not in self._cache:  # computed once per stage, however many times a method asks
            self._cache[name] = source()
        return self._cache[name]

    def attention(self) -> Tensor:
        return self._signal("attention", "attention_from")

    def attention_of(self, rows: Tensor, real: Tensor) -> Tensor:
        """Like :meth:`attention`, for query rows the method chooses: slots ``rows [B, R]``, ``real [B, R]`` marking
        which of them count (e.g. SparseVLM's text raters)."""
        if self.signals.attention_of is None:
            raise RuntimeError("this stage did not request attention rows: set Stage.attention_from in stages()")
        return self.signals.attention_of(rows, real)

    def attention_rows(self, rows: Tensor, real: Tensor, per_head: bool = False) -> Tensor:
        """Like :meth:`attention_of`, each query row apart: ``[B, R, L]`` (zeros for rows that do not count), e.g.
        for the largest attention any one text token pays a visual token (MustDrop's individual attention); with
        ``per_head`` each head apart too, ``[B, heads, R, L]``, for methods that weight heads (AdaptInfer)."""
        if self.signals.attention_rows is None:
            raise RuntimeError("this stage did not request attention rows: set Stage.attention_from in stages()")
        return self.signals.attention_rows(rows, real, per_head)

    def query_states(self) -> Tensor:
        return self._signal("query_states", "states_from")

    def key_states(self) -> Tensor:
        return self._signal("key_states", "states_from")

    def project(self, features: Tensor) -> Tensor:
        """``features [..., D]`` from before the projector mapped through it, ``[..., hidden]``."""
        if self.projector is None:
            raise RuntimeError(
                f"{self.model.family_name or self.model.family} offers no per-token projector at this stage: "
                "ctx.project works before the LLM (layer=None) on families with ModelInfo.per_token_projector"
            )
        return self.projector(features)

    def per_item(self, values: Tensor) -> list[Tensor]:
        """Split a ``[B, L]`` per-slot tensor into one tensor per item (its current tokens, in order)."""
        return [values[view.sample, view.slots] for view in self.items]
