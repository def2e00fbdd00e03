"""The public verbs: wrap a model, list the methods."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from vtprune.adapters import find_adapter, find_vit_adapter
from vtprune.core.adapter import Adapter
from vtprune.core.budget import BUDGET_CONVENTIONS, BUDGET_UNITS, Keep, validate_keep
from vtprune.core.compat import MASK_BUILDERS, SOFTMAX_ATTENTION, check_transformers_version
from vtprune.core.compose import Compose, check_keeps
from vtprune.core.engine import PruningEngine
from vtprune.core.handle import WRAPPED_ATTRIBUTE, Pruning
from vtprune.core.registry import (
    ATTENTION_QUERIES,
    WRAPPABLE,
    Method,
    ModelInfo,
    Stage,
    make_method,
    method_kind,
)
from vtprune.core.tower import TowerReduction
from vtprune.core.vit import ViTMethod, ViTPruning, wrap_vit


def wrap(
    model: nn.Module,
    method: str | Method | ViTMethod,
    keep: Keep | tuple[Keep, ...],
    *,
    budget: str = "final",
    budget_unit: str = "video",
    tokenizer: Any = None,
    **options: Any,
) -> Pruning | ViTPruning:
    """Patch ``model`` in place so its forward (and ``generate``) prunes visual tokens; returns the handle.

    Args:
        model: a supported Hugging Face VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), or a timm
            ``VisionTransformer`` / open_clip visual tower / transformers ``CLIPVisionModel`` (then ``method`` is a
            ViT method: ``evit``, ``tome``; ``keep`` counts patch rows after the last reducing block; returns a
            ``ViTPruning`` handle). A ViT method on LLaVA-1.5 reduces its CLIP tower the same way, and the LLM
            receives ``keep`` visual tokens per image, each on the patch its tower row stands for.
        method: a registered method name (see :func:`list_methods`) or a method config such as ``vtprune.FastV()``.
        keep: visual tokens kept per image (int >= 1) or the fraction of each image's tokens kept (float in (0, 1]);
            for a composed method (``"divprune+random"``, :class:`~vtprune.core.compose.Compose`) one per part.
        budget: what ``keep`` counts: ``"final"`` (default) the visual tokens the LLM finally sees per image;
            ``"average"`` the equivalent average over all decoder layers, as in-LLM papers report (SparseVLM,
            PyramidDrop, EntropyPrune). The same for pruning before the LLM.
        budget_unit: what ``keep`` counts on a video: ``"video"`` (default) the tokens of the whole video (a fraction:
            of the video's tokens), which a method may spread unevenly over its frames (EVS keeps the first frame
            whole); ``"frame"`` each frame's tokens, every frame budgeted on its own. Images are unaffected.
        tokenizer: the model's tokenizer, for methods that read the question as words (MMTok's keyword filter).
        **options: fields of the method's config (e.g. ``layer=2`` for FastV).

    The returned :class:`~vtprune.core.handle.Pruning` reports what each forward kept and undoes the wrap with
    ``unwrap()``; it is also a context manager.
    """
    keeps = tuple(keep) if isinstance(keep, (tuple, list)) else None  # one budget per part of a composition
    keep = validate_keep(keeps[-1] if keeps else keep)
    check_transformers_version()  # warns once outside the tested range; never refuses
    vit = find_vit_adapter(model)
    if vit is not None:
        if budget != "final" or budget_unit != "video" or tokenizer is not None:
            raise ValueError(
                "budget, budget_unit and tokenizer apply to VLMs; a vision transformer takes method, keep and options"
            )
        return wrap_vit(model, vit, method, keep, **options)
    if budget not in BUDGET_CONVENTIONS:
        raise ValueError(f"budget must be one of {BUDGET_CONVENTIONS}, got {budget!r}")
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(
            f"budget_unit must be one of {BUDGET_UNITS} (what keep counts on a video), got {budget_unit!r}"
        )
    adapter = find_adapter(model)
    for module in (model, adapter.vlm):
        existing = getattr(module, WRAPPED_ATTRIBUTE, None)
        if existing is not None:
            raise ValueError(
                f"this model is already wrapped by vtprune ({existing.method.name}, keep={existing.keep}); "
                "call .unwrap() on that handle before wrapping it again"
            )
    tower = None
    if _is_vit_method(method):
        tower = _wrap_tower(adapter, method, keep, options)
        # a ViT method may say how its kept tokens are numbered in the LLM (FlowCut: as its authors' LLaVA, closed up)
        config: Method = TowerReduction(vit=tower.method, positions=getattr(tower.method, "positions", "keep"))
    else:
        config = make_method(method, **options)
    if keeps is not None:
        if not isinstance(config, Compose):
            raise ValueError(
                f"keep={keeps}: one budget per part applies to composed methods (e.g. 'divprune+random'); "
                f"{config.name} takes one keep"
            )
        config = dataclasses.replace(config, keeps=check_keeps(config.label, keeps, len(config.parts)))
    for part in config.parts if isinstance(config, Compose) else (config,):
        units = getattr(part, "budget_units", BUDGET_UNITS)
        if budget_unit not in units:
            raise ValueError(
                f"{part.name} accepts budget_unit {' or '.join(map(repr, units))}, not {budget_unit!r}: it moves the "
                "budget between a video's frames, so keep must count whole videos"
            )
    try:
        info = model_info(adapter)
        stages = checked_stages(config, config.stages(info, keep), info)
        engine = PruningEngine(
            model, adapter, config, keep, stages, info, budget, tokenizer, tower=tower, budget_unit=budget_unit
        )
        engine.install()
    except Exception:
        if tower is not None:
            tower.unwrap()
        raise
    handle = Pruning(engine)
    for module in (model, adapter.vlm):
        setattr(module, WRAPPED_ATTRIBUTE, handle)
    return handle


def _is_vit_method(method: str | Method | ViTMethod) -> bool:
    return isinstance(method, ViTMethod) or (isinstance(method, str) and method_kind(method) == "vit")


def _wrap_tower(adapter: Adapter, method: str | ViTMethod, keep: Keep, options: dict[str, Any]) -> ViTPruning:
    """Wrap the VLM's vision tower with a ViT method, its schedule ending at the layer the VLM reads."""
    tower, feature_blocks = adapter.reducible_tower()
    vit = find_vit_adapter(tower)
    if vit is None:
        raise TypeError(f"ViT-side methods cannot reduce this {adapter.display_name}'s {type(tower).__name__} tower")
    vit.feature_blocks = feature_blocks
    return wrap_vit(tower, vit, method, keep, **options)


def adapter_for(model: nn.Module) -> Adapter:
    """The family adapter of ``model`` (module paths, placeholder tokens, positions), for tools built on vtprune."""
    return find_adapter(model)


def unwrap(model: nn.Module) -> nn.Module:
    """Undo :func:`wrap` on ``model`` (no-op when it is not wrapped)."""
    handle = getattr(model, WRAPPED_ATTRIBUTE, None)
    if handle is not None:
        handle.unwrap()
    return model


def model_info(adapter: Adapter) -> ModelInfo:
    """What methods may know about the adapter's model (works on the ``meta`` device too)."""
    return ModelInfo(
        family=adapter.family,
        num_layers=len(adapter.decoder_layers),
        has_cls_token=adapter.has_cls_token,
        mrope=adapter.mrope,
        vision_layers=adapter.vision_depth(),
        vision_feature_layer=adapter.vision_feature_layer(),
        family_name=adapter.display_name,
        layer_types=tuple(adapter.layer_types()),
        per_token_projector=adapter.per_token_projector,
        no_cls_reason=adapter.no_cls_reason,
        tower_attention=adapter.tower_attention,
        modalities=tuple(adapter.visual_token_ids()),
        hidden_size=int(getattr(adapter.text_config, "hidden_size", 0) or 0),
    )


def checked_stages(config: Method, stages: list[Stage], info: ModelInfo) -> list[Stage]:
    if not stages:
        raise ValueError(f"{config.name}: stages() returned no pruning point")
    layers = [-1 if s.layer is None else s.layer for s in stages]
    if layers != sorted(set(layers)):
        raise ValueError(f"{config.name}: stages must prune at increasing layers, got {layers}")
    for stage in stages:
        if stage.layer is not None:
            info.check_layer(config.name, "stage layer", stage.layer)
            _check_layer_types(config.name, stage, info)
        for name in ("attention_from", "states_from"):
            source = getattr(stage, name)
            if source is not None and (stage.layer is None or not 0 <= source <= stage.layer):
                raise ValueError(
                    f"{config.name}: {name}={source} must be a decoder layer at or before the stage's layer {stage.layer}"
                )
        if stage.states_from is not None and stage.states_from == stage.layer:
            raise ValueError(f"{config.name}: states_from must be a layer before the stage's layer {stage.layer}")
        if stage.query not in ATTENTION_QUERIES:
            raise ValueError(f"{config.name}: query must be one of {ATTENTION_QUERIES}, got {stage.query!r}")
        for layer in (*stage.vision_layers, *stage.vision_received, *(layer for layer, _ in stage.vision_maps)):
            if not 0 <= layer < info.vision_layers:
                raise ValueError(
                    f"{config.name}: vision layer {layer} is outside the vision tower ({info.vision_layers} layers)"
                )
        other = sorted({t for t in info.layer_types if t != "full_attention"})
        if stage.earlier_caches and (stage.layer is None or other):
            family = info.family_name or info.family
            where = "it prunes before the LLM" if stage.layer is None else f"{family} has {', '.join(other)} layers"
            raise ValueError(
                f"{config.name}: earlier_caches cuts the stage's dropped tokens from the KV caches of the layers "
                f"before it, which needs an in-LLM stage and full-attention caches, but {where}"
            )
        if stage.dynamic and stage.layer is None:
            raise ValueError(f"{config.name}: a dynamic stage (items may keep no token) must lie inside the LLM")
        if not (stage.scale > 0 or (stage.scale == 0 and stage.layer is not None)):
            raise ValueError(
                f"{config.name}: stage scale must be positive (0 only inside the LLM: drop every visual token), "
                f"got {stage.scale}"
            )
    return stages


def _check_layer_types(name: str, stage: Stage, info: ModelInfo) -> None:
    """In-LLM pruning rebuilds the masks of every later layer and recomputes attention from Q/K: refuse, before
    anything runs, layers whose inputs vtprune cannot rebuild (e.g. linear attention) or that have no attention."""
    types = info.layer_types
    if not types:
        return
    rebuildable = sorted(MASK_BUILDERS)
    unsupported = sorted({t for t in types[stage.layer :] if t not in MASK_BUILDERS})
    if unsupported:
        raise ValueError(
            f"{name}: decoder layers from {stage.layer} on include {', '.join(unsupported)} layers, whose inputs "
            f"vtprune cannot rebuild after pruning (it can: {', '.join(rebuildable)}); prune before the LLM "
            "(layer=None) instead"
        )
    for field_name in ("attention_from", "states_from"):
        source = getattr(stage, field_name)
        if source is not None and types[source] not in SOFTMAX_ATTENTION:
            usable = [i for i, t in enumerate(types[: stage.layer + 1]) if t in SOFTMAX_ATTENTION]
            raise ValueError(
                f"{name}: {field_name}={source} is a {types[source]} layer without softmax attention; "
                f"attention layers at or before {stage.layer}: {usable}"
            )


def report(
    model: nn.Module,
    inputs: dict[str, Any],
    methods: list[str] | tuple[str, ...] = ("fastv",),
    keep: list[Keep] | tuple[Keep, ...] = (64,),
    **kwargs: Any,
) -> Any:
    """FLOPs and latency of ``model`` on ``inputs``, dense and under every (method, keep); returns a
    :class:`~vtprune.eval.report.Report` (``to_dict``, ``to_csv``, ``to_json``, ``plot``, ``table``)."""
    from vtprune.eval.report import build_report

    for name in methods:
        make_method(name, kind=WRAPPABLE)  # unknown names fail before anything runs
    for value in keep:
        validate_keep(value)
    return build_report(model, inputs, list(methods), list(keep), **kwargs)
