"""Methods: a config dataclass per pruning method, registered by name.

A method is a dataclass whose fields are its options (defaults = its authors' defaults). It says *where* it prunes
(:meth:`Method.stages`) and *how it ranks* the visual tokens (:meth:`Method.score`, or :meth:`Method.select` for
greedy selectors). Everything else (budgets per image, top-k, gathering hidden states, positions, masks, the KV
cache) is the engine's job, so a method is usually a few lines.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from vtprune.core.budget import BUDGET_UNITS, Keep, validate_keep
from vtprune.core.compat import SOFTMAX_ATTENTION

if TYPE_CHECKING:
    from vtprune.core.context import ItemView, PruneContext
    from vtprune.core.layout import Layout, VisualItem

POSITION_CONVENTIONS = ("keep", "renumber")
# Query rows whose attention a stage can ask for: the last prompt token, the instruction (text after the last
# image), or every token (averaged).
ATTENTION_QUERIES = ("last", "instruction", "all")


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the wrapped model."""

    family: str
    num_layers: int
    has_cls_token: bool
    mrope: bool
    # Vision tower depth and the 0-based index of the tower layer whose output feeds the projector
    # (LLaVA-1.5: 24 and 22, i.e. hidden_states[-2]); 0 when the family has no such tower.
    vision_layers: int = 0
    vision_feature_layer: int = 0
    family_name: str = ""
    # attention type of every decoder layer ("full_attention", "sliding_attention", "linear_attention", ...)
    layer_types: tuple[str, ...] = ()
    # tower tokens are projected one by one, so merging before the projector is possible (see Adapter)
    per_token_projector: bool = True
    # why [CLS] signals are missing, where has_cls_token is False
    no_cls_reason: str = "towers have no [CLS] token"
    # the adapter maps the tower's attention (every query row, Stage.vision_received) onto the LLM's tokens
    tower_attention: bool = False
    # the kinds of visual input the family takes ("image", "video")
    modalities: tuple[str, ...] = ("image",)
    # the language model's hidden width (trained methods check their weights against it; 0: unknown)
    hidden_size: int = 0

    def scale_layers(
        self, layers: tuple[int, ...], reference_depth: int = 32, *, minimum: int = 1, maximum: int | None = None
    ) -> list[int]:
        """Layers of a schedule the authors wrote for ``reference_depth`` layers, mapped onto this model's depth:
        proportionally, within ``[minimum, maximum]``, kept strictly increasing (unchanged at the reference depth)."""
        top = self.num_layers - 1 if maximum is None else maximum
        scaled: list[int] = []
        for layer in layers:
            value = min(top, max(minimum, round(layer * self.num_layers / reference_depth)))
            scaled.append(max(value, scaled[-1] + 1) if scaled else value)
        return scaled

    def output_pruned_layers(
        self, method: str, given: tuple[int, ...] | None, authors: tuple[int, ...], reference_depth: int = 32
    ) -> list[int]:
        """0-based layers whose *output* a method prunes (SparseVLM, AdaptInfer: scored by layer l, dropped at the
        input of l + 1): ``given``, or the ``authors``' layers scaled from ``reference_depth``; checked to increase
        and to leave a layer after each."""
        if given is None:
            layers = self.scale_layers(authors, reference_depth, minimum=0, maximum=self.num_layers - 2)
        else:
            layers = list(given)
        if layers != sorted(set(layers)):
            raise ValueError(f"{method}: layers must increase, got {layers}")
        for layer in layers:
            self.check_layer(method, "layers", layer, minimum=0)
            self.check_layer(method, "layers (+1, where the drop happens)", layer + 1, minimum=1)
        return layers

    def softmax_layers(self) -> list[int]:
        """The decoder layers with softmax attention (whose attention rows and keys can be recomputed)."""
        types = self.layer_types or ("full_attention",) * self.num_layers
        return [i for i, layer_type in enumerate(types) if layer_type in SOFTMAX_ATTENTION]

    def last_softmax_layer(self, before: int) -> int | None:
        """The last softmax-attention layer below ``before``, or None: on hybrid models (Qwen3.5's linear-attention
        layers) a method reads that one."""
        usable = [i for i in self.softmax_layers() if i < before]
        return usable[-1] if usable else None

    def softmax_source(
        self, method: str, layer: int, what: str = "attention could rank the tokens", hint: str = ""
    ) -> int:
        """:meth:`last_softmax_layer` below ``layer``, or a clear error naming the first layer that has one
        (``what`` the method reads there; ``hint`` another way out, e.g. an option that drops the stage)."""
        source = self.last_softmax_layer(layer)
        if source is None:
            usable = self.softmax_layers()
            need = f"layer must be at least {usable[0] + 1}" if usable else "this model has none"
            raise ValueError(
                f"{method}: layer={layer} has no softmax-attention layer before it whose {what}; {need}{hint}"
            )
        return source

    def _accepts(self, method: str) -> bool:
        """Whether ``method`` with its defaults would accept this model (its own ``stages()`` raises otherwise)."""
        try:
            method_class(method)().stages(self, 1)
        except ValueError:
            return False
        return True

    def require_cls_token(self, method: str) -> None:
        """Raise a clear error on families whose vision tower has no [CLS] token."""
        if not self.has_cls_token:
            usable = [n for n in list_methods("llm") if not method_class(n).needs_cls_token and self._accepts(n)]
            raise ValueError(
                f"{method} ranks tokens by the vision tower's [CLS] attention, but {self.family_name} "
                f"{self.no_cls_reason}; methods that apply to {self.family_name}: {', '.join(usable)}"
            )

    def check_layer(self, method: str, name: str, value: int, minimum: int = 0) -> None:
        """Raise a clear error when a decoder layer index lies outside ``[minimum, num_layers - 1]``."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{method}: {name} must be an int, got {value!r}")
        if not minimum <= value < self.num_layers:
            raise ValueError(
                f"{method}: {name}={value} is outside the model: its language model has {self.num_layers} decoder "
                f"layers, so {name} must lie in [{minimum}, {self.num_layers - 1}]"
            )


@dataclass(frozen=True)
class Stage:
    """One pruning point.

    ``layer=None`` prunes before the LLM (image features and their placeholder tokens are dropped); ``layer=K``
    prunes the hidden states entering decoder layer K.

    Budget: each image keeps ``scale`` times the wrap's budget (capped at its token count), so a progressive
    schedule can keep several times its final budget at earlier stages (``scale=0`` inside the LLM drops every visual
    token there: ToDRE's ``drop_all``); with ``per_crop`` the budget applies to each view
    of an any-resolution image (LLaVA-NeXT) instead of the whole image, as FasterVLM / VisionZip / MMTok count.

    Signals (what ``PruneContext`` can then provide):

    * ``attention_from``: decoder layer whose attention rows for ``query`` the scores need. They are recomputed from
      that layer's queries and keys for just those rows, so the model keeps running with SDPA / FlashAttention.
      ``attention_from == layer`` recomputes them from the stage layer's own input (PyramidDrop, TransPrune).
    * ``states_from``: decoder layer whose query states (after RoPE) ``ctx.query_states()`` returns.
    * ``vision_layers``: vision-tower layers whose [CLS] -> token attention each image's ``cls_attention`` holds.
    * ``vision_received``: vision-tower layers whose *received* attention each image's ``received_attention`` holds:
      the head-averaged attention a token receives, averaged over every query token of its view (a Qwen image
      frame, windows ignored), recomputed from the layer's queries and keys (families with
      ``ModelInfo.tower_attention``).
    * ``vision_maps``: ``(tower layer, fn)`` pairs: ``fn(queries, keys, scale)`` maps the queries and keys
      ``[heads, T, head_dim]`` (after any RoPE) of each run of ``T`` tower rows that attend to each other in full (a
      view; a Qwen image frame, windows ignored) to one value per row ``[T]``; each image's ``vision_maps`` holds
      them per token (rows merged into one token averaged), on the same families as ``vision_received``. Equal
      pairs are computed once per encoder call, so ``fn`` should compare by value (e.g. a frozen dataclass).
    * ``pixel_maps``: functions mapping the pixel patches ``[P, C, p, p]`` each view's tower rows embed (as the tower
      receives them, normalised) to one value per patch ``[P]``; each image's ``pixel_maps`` holds them per token
      (families whose adapter implements ``vision_pixel_patches``: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision).
    * ``encoder_features``: each image's features before the projector (``ItemView.encoder_features``).
    * ``text_embeddings``: the LLM input embeddings of each prompt's instruction (``ctx.instruction_embeddings``).
    * ``modalities``: the kinds of items the stage budgets ("image", "video"; None: all); others keep every token.
    * ``resample``: images are re-encoded on the grid the method's ``target_grid(rows, cols, budget)`` returns
      (``ItemView.replacement`` holds the new features); before the LLM only.
    * ``tower``: the vision tower reduced each image's rows itself (a ViT method wrapped inside the VLM); each of
      its rows reaches the LLM on the token its representative stands for (``ItemView.tower_tokens``).
    * ``budget_rule``: ``fn(keep, item) -> int``, the tokens an item keeps at this stage instead of the engine's
      count (capped at the item's selectable tokens), e.g. EVS's ``max(N, int(T * N * keep))`` that keeps a video's
      first frame whole; for a rule that depends on the budget and the item's shape alone.
    * ``dynamic``: the method's ``select`` decides each item's count, anywhere from 0 (the item's visual tokens all
      leave the sequence here: DyVTE's exit; in-LLM stages only) to the item's budget (ATP-LLaVA's instance-wise
      counts); without it a method keeps at least one token of an item whose budget is positive.
    * ``earlier_caches``: an in-LLM stage whose dropped tokens also leave the KV caches of the decoder layers before
      it once the prefill is done (PruneVid's retroactive cut), so every decode step attends to the kept tokens
      only, in every layer. The prefill is unchanged; the record lists the cut as a decode drop of step 0. Needs
      caches of full-attention layers (as decode drops).
    """

    layer: int | None
    scale: float = 1.0
    per_crop: bool = False
    attention_from: int | None = None
    query: str = "last"
    states_from: int | None = None
    vision_layers: tuple[int, ...] = ()
    vision_received: tuple[int, ...] = ()
    vision_maps: tuple[tuple[int, Callable[[Tensor, Tensor, float], Tensor]], ...] = ()
    pixel_maps: tuple[Callable[[Tensor], Tensor], ...] = ()
    encoder_features: bool = False
    text_embeddings: bool = False
    resample: bool = False
    tower: bool = False
    modalities: tuple[str, ...] | None = None
    # which part of a composed method (vtprune.Compose) the stage belongs to, and that part's position
    # convention (None: the method's own)
    part: int = 0
    positions: str | None = None
    budget_rule: Callable[[Keep, VisualItem], int] | None = None
    earlier_caches: bool = False
    # the method decides how many tokens each item keeps, from none (every visual token of the item leaves here:
    # DyVTE's exit) to its budget (an instance-wise count: ATP-LLaVA's learned thresholds)
    dynamic: bool = False

    @property
    def needs_vision_call(self) -> bool:
        """True when the vision encoder call must be observed (tower signals, per-view budgets, re-encoding)."""
        return (
            bool(self.vision_layers or self.vision_received or self.vision_maps or self.pixel_maps)
            or self.encoder_features
            or self.per_crop
            or self.resample
            or self.tower
        )


@dataclass(frozen=True)
class DecodeStage:
    """A decode-time pruning point: while generating, cached visual tokens leave the KV cache of every decoder
    layer (``mask_from=None``, eviction: MustDrop) or are hidden from the attention of the later layers for a step
    (``mask_from=M``, masking: DyCoke).

    During decode step ``t`` (1 = the forward that reads the first generated token) the engine recomputes the
    attention of the step's newest token in decoder layer ``layer`` (its query against that layer's cached keys
    and its own) and asks :meth:`Method.decode_score` to rank each image's cached tokens. Each image keeps
    ``ceil(keep * n)`` of its ``n`` cached selectable tokens (at least one; structural tokens such as LLaVA-NeXT's
    newlines stay). It runs after step 1 only (``every=0``) or at every ``every``-th step.

    * Eviction (``mask_from=None``): the lowest ones are removed from every layer's cache before step ``t + 1``
      (kept tokens and later tokens keep their positions).
    * Masking (``mask_from=M``, ``layer < M``): nothing leaves the cache; in this step already, decoder layers
      ``M ..`` attend to the kept visual tokens (and all text) only, and so does every later step until the stage
      chooses again. ``decode_score`` may give ``None`` for an item: no new choice this time; with ``reuse`` the
      item's previous selection stays (none yet: it is not masked), without it the item is unmasked for the step
      (what DyCoke's reference code does when attention is stable).

    ``part``: in a composition (``vtprune.Compose``), the part whose ``decode_score`` ranks and whose state it reads.
    """

    layer: int
    keep: float
    every: int = 0
    mask_from: int | None = None
    reuse: bool = True
    part: int = 0

    def due(self, step: int) -> bool:
        """Whether this stage chooses during (masking) / drops after (eviction) decode step ``step`` (1-based)."""
        return step == 1 if self.every == 0 else step % self.every == 0

    @property
    def evicts(self) -> bool:
        """True for eviction from every layer's cache, False for per-step masking of layers ``mask_from ..``."""
        return self.mask_from is None


@dataclass
class Merged:
    """A merging method's result for one image: the tokens that stay (their slots and positions) and the features
    they carry from now on, row i belonging to ``indices[i]`` (indices into the image's current tokens).

    ``space="llm"``: features in the LLM's input / hidden space; ``space="encoder"``: before the projector (pre-LLM
    stages only; the adapter projects them, e.g. VisionZip merges in CLIP space).
    """

    indices: Tensor
    features: Tensor
    space: str = "llm"
    # M-RoPE (t, h, w) positions of the kept tokens, [k, 3], and how many positions the image no longer spans, by
    # which every later token of its prompt moves down (an image re-encoded on a smaller grid); None: keep positions.
    positions: Tensor | None = None
    advance: int = 0
    # per row, whether it combines several tokens (or [CLS]) rather than passing one token's own features on;
    # None: every row does. For reports and pictures only.
    combined: Tensor | None = None


_REGISTRY: dict[str, type] = {}


@dataclass
class Method:
    """Base class of every pruning method config.

    Subclasses are dataclasses registered with :func:`register_method`. They set the class variables below and
    implement :meth:`stages` and :meth:`score` (or :meth:`select`).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "llm"
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # True for methods that rank by the vision tower's [CLS] attention (unusable on Qwen's towers).
    needs_cls_token: ClassVar[bool] = False
    # True for methods whose select() returns Merged results (kept tokens carry new features).
    merges: ClassVar[bool] = False
    # the wrap's budget_unit values the method accepts (EVS moves budget between a video's frames: "video" only)
    budget_units: ClassVar[tuple[str, ...]] = BUDGET_UNITS
    # True for methods whose modules were trained (DyVTE, ATP-LLaVA, TokenFLEX): they load weights from safetensors
    trained: ClassVar[bool] = False
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.positions not in POSITION_CONVENTIONS:
            raise ValueError(
                f"{type(self).__name__}: positions must be one of {POSITION_CONVENTIONS}, got {self.positions!r}"
            )

    def count_known_early(self) -> bool:
        """True when the number of visual tokens the LLM receives depends on the budget alone, so a serving engine
        (e.g. vLLM) can size the image placeholders before prefill."""
        return False

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        """Where this method prunes on ``model`` for budget ``keep``; raise ValueError for options it can't honour."""
        raise NotImplementedError

    def observed_layers(self, model: ModelInfo) -> tuple[int, ...]:
        """Decoder layers whose sub-layer inputs and outputs :meth:`observe` should see during prefill."""
        return ()

    def decode_stages(self, model: ModelInfo, keep: Keep) -> list[DecodeStage]:
        """Where this method drops cached visual tokens while generating (see :class:`DecodeStage`); none by
        default."""
        return []

    def decode_score(self, ctx: PruneContext) -> list[Tensor | None]:
        """At a :class:`DecodeStage`: one score per cached token of each item in ``ctx.items`` (higher = keep);
        ``ctx.attention()`` is the step's newest token's attention over the cached slots, ``ctx.step`` the step.
        At a masking stage (``mask_from``) an item's entry may be None: no new choice at this step (see
        :class:`DecodeStage`)."""
        raise NotImplementedError(f"{type(self).__name__} declares decode stages but implements no decode_score()")

    def scorer(self, stage: Stage, state: dict) -> tuple[Method, dict]:
        """The method that ranks ``stage``'s tokens and the ``state`` it reads: itself and the forward's state, or a
        composition's part and that part's own state."""
        return self, state

    def observe(self, state: dict, layer: int, part: str, inputs: Tensor, output: Tensor, layout: Layout) -> None:
        """Called during prefill for each layer of :meth:`observed_layers` and ``part`` in ("attention", "mlp") with the
        sub-layer's (normalised) input and its output before the residual add; ``state`` is ``ctx.state`` later."""

    def score(self, ctx: PruneContext) -> list[Tensor]:
        """One score per current token of each item in ``ctx.items`` (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor select()")

    def select(self, ctx: PruneContext) -> list[Tensor | Merged]:
        """Per item, indices (into its current tokens) to keep, at most its budget, or a :class:`Merged`; the default
        takes the top-``budget`` scores."""
        return top_budget(ctx.items, self.score(ctx))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Method:
        """Rebuild a config written by :meth:`to_dict`."""
        data = dict(data)
        return make_method(data.pop("method"), **data)


@dataclass
class SingleStageMethod(Method):
    """A method that prunes once, before the LLM (``layer=None``, the default) or at decoder layer ``layer``, and
    needs no model signal to do so (e.g. random, uniform, pooling)."""

    layer: int | None = None
    positions: str = "renumber"

    def count_known_early(self) -> bool:
        return self.layer is None

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        if self.layer is not None:
            model.check_layer(self.name, "layer", self.layer)
        return [Stage(layer=self.layer)]


def top_budget(items: list[ItemView], scores: list[Tensor]) -> list[Tensor]:
    """Per item (per view of it, for per-crop budgets), the indices of its highest-scoring selectable tokens."""
    selections = []
    for view, item_scores in zip(items, scores, strict=True):
        if item_scores.shape != view.tokens.shape:
            raise RuntimeError(f"scores of shape {tuple(item_scores.shape)} for an image with {view.num_tokens} tokens")
        item_scores = item_scores.float().masked_fill(~view.selectable, float("-inf"))
        chosen = []
        for members, budget in view.budget_groups():
            chosen.append(members[torch.topk(item_scores[members], budget, sorted=False).indices])
        selections.append(torch.cat(chosen))
    return selections


# What a registered name is: LLM-side methods wrap a VLM, ViT methods reduce a vision transformer's rows (alone or
# as LLaVA-1.5's tower), trained methods are models of their own that vtprune ships and lists but cannot wrap.
METHOD_KINDS = {
    "llm": "methods that prune a VLM's visual tokens",
    "vit": "methods for vision transformers",
    "trained": "trained models",
}
WRAPPABLE = ("llm", "vit")


def register_method(cls: type) -> type:
    """Class decorator adding a method to the one registry under ``cls.name``, with its ``cls.kind`` (see
    :data:`METHOD_KINDS`; :class:`Method` subclasses are ``"llm"``). Method modules register themselves when
    ``vtprune.methods`` is imported; the core never imports them."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} must set a non-empty class variable `name`")
    kind = getattr(cls, "kind", None)
    if kind not in METHOD_KINDS:
        raise ValueError(f"{cls.__name__}: kind must be one of {sorted(METHOD_KINDS)}, got {kind!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (a method registered for a session or a test); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def _kinds(kind: str | tuple[str, ...] | None) -> tuple[str, ...]:
    kinds = tuple(METHOD_KINDS) if kind is None else (kind,) if isinstance(kind, str) else tuple(kind)
    unknown = [k for k in kinds if k not in METHOD_KINDS]
    if unknown:
        raise ValueError(f"kind must be one of {sorted(METHOD_KINDS)}, got {unknown[0]!r}")
    return kinds


def list_methods(kind: str | tuple[str, ...] | None = None) -> list[str]:
    """Names of the registered methods, all of them or those of ``kind`` (``"llm"``, ``"vit"``, ``"trained"``)."""
    kinds = _kinds(kind)
    return sorted(name for name, cls in _REGISTRY.items() if cls.kind in kinds)


def method_kind(name: str) -> str | None:
    """The kind of a registered name, None for an unknown one."""
    cls = _REGISTRY.get(name)
    return None if cls is None else cls.kind


def method_class(name: str, kind: str | tuple[str, ...] = "llm") -> type:
    """The registered class of ``name`` among the methods of ``kind``; a ValueError that lists them otherwise (and
    says where a name of another kind belongs)."""
    kinds = _kinds(kind)
    cls = _REGISTRY.get(name)
    if cls is not None and cls.kind in kinds:
        return cls
    hint = ""
    if cls is not None:  # a name of another kind: say where it belongs
        hint = {
            "llm": f" ({name!r} prunes a VLM's visual tokens: wrap a VLM with it)",
            "vit": f" ({name!r} is for vision transformers: pass it to vtprune.wrap)",
            "trained": f" ({getattr(cls, 'usage', '')})",
        }[cls.kind]
    what = "ViT method" if kinds == ("vit",) else "method"
    noun = METHOD_KINDS["vit"] if kinds == ("vit",) else "registered methods"
    raise ValueError(f"unknown {what} {name!r}{hint}; {noun}: {', '.join(list_methods(kinds))}")


def make_method(method: str | Any, kind: str | tuple[str, ...] = "llm", **options: Any) -> Any:
    """A method config from a registered name or a config object (of ``kind``), ``options`` filling its fields; a
    composed name (``"divprune+random"``, ``"compose"``) gives a :class:`~vtprune.core.compose.Compose`."""
    if isinstance(method, str) and "llm" in _kinds(kind) and ("+" in method or method == "compose"):
        from vtprune.core.compose import (
            compose_by_name,  # the composition is built on this registry
        )

        return compose_by_name(method, **options)
    if isinstance(method, str):
        cls, base = method_class(method, kind), None
    elif dataclasses.is_dataclass(method) and getattr(method, "kind", None) in _kinds(kind):
        cls, base = type(method), method
    else:
        raise TypeError(
            f"method must be a registered name ({', '.join(list_methods(kind))}) or a method config such as "
            f"vtprune.FastV(), got {type(method).__name__}"
        )
    check_options(cls, options)
    return dataclasses.replace(base, **options) if base is not None else cls(**options)


def check_options(cls: type, options: dict[str, Any]) -> None:
    """The one check of a method's options: every name must be a field of its config dataclass."""
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{cls.name}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )


__all__ = [
    "Method",
    "ModelInfo",
    "Stage",
    "DecodeStage",
    "METHOD_KINDS",
    "register_method",
    "unregister_method",
    "list_methods",
    "method_kind",
    "method_class",
    "make_method",
    "check_options",
    "validate_keep",
]
