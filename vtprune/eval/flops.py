"""Analytical FLOPs of a VLM forward, from its config and the token counts a (wrapped) forward really used.

Counted as multiply-adds x 2 (one multiply-add = 2 FLOPs), over every matrix product the model runs: the vision
tower (patch embedding, attention projections, attention scores and values, MLP), the projector or patch merger,
each decoder layer (q/k/v/o projections, ``Q K^T`` and ``A V`` with the real query and key lengths of that layer,
the gated MLP or the MoE block's router, routed and shared experts) and the LM head. Qwen3.5's Gated DeltaNet
layers count their projections, causal conv1d and the gated delta rule's products, chunked in prefill, recurrent
in decode (:class:`~vtprune.core.shape.LinearAttentionShape` has the formulas and what they leave out). Norms,
activations, softmax and RoPE are not counted (they are O(n d), not O(n d^2)); neither is the quadratic term
halved for causality, because SDPA / eager kernels compute the full ``n x n`` product (FlashAttention skips about
half of it; the difference is printed where it matters). This is what ``torch.utils.flop_counter.FlopCounterMode``
counts, and the tests hold the two within 2 % (equal without attention-scored pruning), but for one term:
FlopCounterMode misses the Gated DeltaNet's recurrent decode step (written as broadcast products), counted here.

Token counts come from a wrapped model's last record (:func:`prefill_flops`, per sample, real tokens only) or
from a method's schedule for a what-if estimate (:func:`schedule_flops`). Configs of full-size models need no
weights: :data:`REFERENCE_CONFIGS` builds LLaVA-1.5-7B/13B, LLaVA-NeXT-7B, Qwen2-VL-7B, Qwen2.5-VL-7B, Qwen3-VL-8B,
Qwen3.5-9B and others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vtprune.core.shape import LanguageShape, ModelShape, language_shape


def model_shape(model_or_config: Any) -> ModelShape:
    """The shapes FLOPs depend on, from a model (any device, ``meta`` included) or its config; the family's
    adapter reads its vision side."""
    from vtprune.adapters import adapter_class_for_config

    config = getattr(model_or_config, "config", model_or_config)
    adapter = adapter_class_for_config(config)
    # a family whose decoder the text config does not fully describe (Qwen3.5's gated queries, its MoE block) says so
    family_language = getattr(adapter, "language_shape", None)
    language = family_language(config) if family_language else language_shape(config.get_text_config())
    return ModelShape(config.model_type, language, adapter.vision_shape(config))


@dataclass
class FlopsReport:
    """FLOPs of one forward (all samples), by component; ``decode_per_token`` is the cost of generating one more
    token after it, with the KV cache the prefill left (per-layer lengths after pruning)."""

    vision: float = 0.0
    projector: float = 0.0
    layers: list[float] = field(default_factory=list)
    lm_head: float = 0.0
    decode_per_token: float = 0.0

    @property
    def llm(self) -> float:
        return sum(self.layers)

    @property
    def prefill(self) -> float:
        return self.vision + self.projector + self.llm + self.lm_head

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "llm": self.llm, "prefill": self.prefill}


def llm_flops(
    shape: LanguageShape, tokens_per_layer: list[list[int]], logits_rows: list[int] | None = None
) -> tuple[list[float], float, float]:
    """(FLOPs per decoder layer, LM head FLOPs, FLOPs of one decoded token) for per-sample token counts per layer.

    ``tokens_per_layer[l][b]``: tokens of sample b entering layer l (the prefill's queries and keys there, and the
    KV-cache length that layer keeps; a linear-attention layer keeps a fixed-size state instead). ``logits_rows[b]``:
    rows the LM head computes (all tokens in a forward, 1 in ``generate``); default all. Per sample: a padded batch's
    padding is not counted (nor, for a linear layer, the chunks its padding may add).
    """
    layers = [
        sum(shape.layer_flops(n, n, layer) for n in counts) for layer, counts in enumerate(tokens_per_layer)
    ]
    rows = logits_rows if logits_rows is not None else tokens_per_layer[-1]
    decode = sum(
        shape.layer_flops(1, shape.decode_keys(layer, n + 1), layer)
        for layer, counts in enumerate(tokens_per_layer)
        for n in counts
    )
    decode += shape.lm_head_flops(len(tokens_per_layer[0]))
    return layers, shape.lm_head_flops(sum(rows)), decode


def sample_llm_flops(shape: LanguageShape, tokens_per_layer: list[list[int]]) -> list[float]:
    """Per sample, the prefill FLOPs of its decoder layers and its LM head rows (its own real tokens at each layer:
    samples of one batch may keep different tokens, e.g. leave visual tokens at different layers)."""
    batch = len(tokens_per_layer[0]) if tokens_per_layer else 0
    return [
        sum(shape.layer_flops(counts[b], counts[b], layer) for layer, counts in enumerate(tokens_per_layer))
        + shape.lm_head_flops(tokens_per_layer[-1][b])
        for b in range(batch)
    ]


def vision_flops(shape: ModelShape, images: list[dict[str, Any]]) -> tuple[float, float]:
    """(tower FLOPs, projector / merger FLOPs) for the encoder inputs ``images``: for CLIP towers
    ``{"views": v}`` per image (with ``block_rows``, the rows entering each block and leaving the last, and
    ``projected_rows`` per view where a ViT method reduced the tower), for Qwen ``{"grid": (t, h, w)}`` in patches
    (with ``embedded_patches`` where the patch embedding ran on a padded canvas: Mistral 3)."""
    vision = shape.vision
    if vision.encoder_input == "views":
        per_view = (vision.image_size // vision.patch) ** 2
        projected = vision.projected_per_view or per_view
        tower = projector = 0.0
        for image in images:
            views, rows = image["views"], image.get("block_rows")
            block_rows = [[r] * views for r in rows] if rows else None
            tower += vision.tower_flops([per_view + int(vision.cls_token)] * views, block_rows=block_rows)
            projector += vision.projector_flops(views * image.get("projected_rows", projected))
        return tower, projector
    grids = [tuple(image["grid"]) for image in images]
    # the towers attend within each temporal slice of a video (one sequence per slice, as their cu_seqlens)
    sequences = [h * w for t, h, w in grids for _ in range(t)]
    windows = vision.window_lengths(grids) if vision.window else None
    merged = sum(sequences) // vision.merge**2
    embedded = sum(image.get("embedded_patches", t * h * w) for image, (t, h, w) in zip(images, grids))
    return vision.tower_flops(sequences, windows, embedded=embedded), vision.projector_flops(merged)


def prefill_flops(model: Any, record: Any, images: list[dict[str, Any]], logits_rows: list[int] | None = None) -> FlopsReport:
    """FLOPs of the forward a wrapped model's ``record`` describes (``pruning.last``; per-sample real tokens)."""
    shape = model_shape(model)
    layers, head, decode = llm_flops(shape.language, record.tokens_per_layer, logits_rows)
    tower, projector = vision_flops(shape, images)
    return FlopsReport(vision=tower, projector=projector, layers=layers, lm_head=head, decode_per_token=decode)


def dense_tokens_per_layer(shape: ModelShape, lengths: list[int]) -> list[list[int]]:
    return [list(lengths) for _ in range(shape.language.layers)]


def schedule_tokens(
    num_layers: int, text_tokens: int, image_tokens: int, stages: list[tuple[int | None, int]]
) -> list[int]:
    """Tokens entering each decoder layer of one prompt under a schedule ``[(layer or None, visual tokens kept)]``."""
    tokens, visual = [], image_tokens
    starts = {0 if layer is None else layer: kept for layer, kept in stages}
    for layer in range(num_layers):
        visual = starts.get(layer, visual)
        tokens.append(text_tokens + visual)
    return tokens


def paper_layer_flops(n: int, hidden: int, intermediate: int, *, gated: bool = False) -> float:
    """The per-layer estimate FastV writes (MACs): ``4 n d^2 + 2 n^2 d + 2 n d m``; EntropyPrune's
    ``8 n d^2 + 4 n^2 d + 6 n d m`` is twice it with a gated (3-matrix) MLP."""
    mlp = 3 if gated else 2
    return float(4 * n * hidden**2 + 2 * n * n * hidden + mlp * n * hidden * intermediate)


def schedule_flops(
    model: Any,
    method: str | Any,
    keep: Any,
    *,
    text_tokens: int,
    image_tokens: int | None = None,
    encoder_inputs: list[dict[str, Any]] | None = None,
    images: int = 1,
    budget: str = "final",
    logits_rows: int = 1,
    **options: Any,
) -> FlopsReport:
    """What-if FLOPs of one prompt under ``method`` at ``keep``, from the method's schedule, without running it.

    ``model`` may live on the ``meta`` device (:func:`~vtprune.eval.configs.meta_model`). The prompt has
    ``text_tokens`` text tokens and ``images`` images of ``image_tokens`` LLM tokens each. LLaVA-1.5 needs neither
    count (576 tokens, one view); Qwen takes ``image_tokens`` as a square of merged tokens (or ``encoder_inputs``
    with the patch grids); LLaVA-NeXT's count depends on the image size, so it needs both ``image_tokens`` and
    ``encoder_inputs=[{"views": v}]``. Exact for pre-LLM and in-LLM dropping; the per-view budgets of ``per_crop``
    methods and the recycled tokens of SparseVLM are data-dependent and counted as one image-wide budget here.
    """
    from vtprune.adapters import find_adapter
    from vtprune.api import checked_stages, model_info
    from vtprune.core.budget import stage_budgets, validate_keep
    from vtprune.core.registry import make_method

    shape = model_shape(model)
    adapter = find_adapter(model)
    info = model_info(adapter)
    config = make_method(method, **options)
    keep = validate_keep(keep)
    stages = checked_stages(config, config.stages(info, keep), info)
    if any(stage.resample for stage in stages):
        raise ValueError(f"{config.name} re-encodes images at a data-dependent size; run the model and use "
                         "prefill_flops(model, pruning.last, ...) instead")  # fmt: skip
    if images < 1 or text_tokens < 0:
        raise ValueError(f"images must be >= 1 and text_tokens >= 0, got images={images}, text_tokens={text_tokens}")
    vision = shape.vision
    if encoder_inputs is None:
        if vision.encoder_input == "views" and vision.fixed_views:
            encoder_inputs = [{"views": vision.fixed_views}] * images
        elif vision.encoder_input == "grid" and image_tokens is not None:
            side = int(round(image_tokens**0.5))
            if side * side != image_tokens:
                raise ValueError(f"image_tokens={image_tokens} is not a square; pass encoder_inputs=[{{'grid': "
                                 "(t, h, w)}] with the patch grid of each image")  # fmt: skip
            encoder_inputs = [{"grid": (1, side * vision.merge, side * vision.merge)}] * images
        else:
            raise ValueError(f"{shape.family}: the image token count depends on the image size; pass image_tokens= "
                             "and encoder_inputs= (LLaVA-NeXT: [{'views': v}] per image)")  # fmt: skip
    if image_tokens is None:
        if vision.encoder_input == "views" and vision.fixed_views:
            image_tokens = vision.fixed_views * (vision.image_size // vision.patch) ** 2
        elif vision.encoder_input == "grid":
            t, h, w = encoder_inputs[0]["grid"]
            image_tokens = t * h * w // vision.merge**2
        else:
            raise ValueError(f"{shape.family}: pass image_tokens= (the LLM tokens of one image, row separators included)")
    kept = stage_budgets(keep, image_tokens, [(s.layer, s.scale) for s in stages], shape.language.layers, budget)
    schedule = [(stage.layer, count * images) for stage, count in zip(stages, kept)]
    tokens = schedule_tokens(shape.language.layers, text_tokens, image_tokens * images, schedule)
    layers, head, decode = llm_flops(shape.language, [[n] for n in tokens], [logits_rows])
    tower, projector = vision_flops(shape, encoder_inputs)
    return FlopsReport(vision=tower, projector=projector, layers=layers, lm_head=head, decode_per_token=decode)
