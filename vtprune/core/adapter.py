"""What the engine asks of a model family. Each family implements this in ``vtprune/adapters/<family>.py``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtprune.core.compat import build_mask, cache_parameter, get_cache, set_cache
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


@dataclass
class ItemSpec:
    """One budgeted unit inside an encoder output: rows ``[start, start + count)`` of its features. Adapters give a
    video one spec per frame; the engine joins them into one spec per video (``frames``: each frame's rows) unless
    the wrap's ``budget_unit`` is ``"frame"`` (``vtprune.core.engine.prefill.join_frames``)."""

    start: int
    count: int
    grids: tuple[GridPart, ...] = ()
    structural: Tensor | None = None
    frames: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of one decoder layer the engine hooks or reruns: recomputing attention rows needs the attention
    module (its ``head_dim``, ``scaling``, grouped KV heads), its query and key projections (also hook points) and the
    norm before them; observing methods see the attention and MLP sub-layers. ``layer_type`` picks its mask."""

    attention: nn.Module
    query: nn.Module
    key: nn.Module
    input_norm: nn.Module
    mlp: nn.Module
    layer_type: str = "full_attention"
    # q_proj emits [query | gate] per head (Qwen3.5's gated attention); only the query half enters the scores
    gated_query: bool = False
    # RoPE rotates adjacent dims (2i, 2i + 1) rather than the two halves (GLM-4V's rotate_half_llm)
    interleaved_rotary: bool = False


@dataclass
class VisualChunk:
    """One entry of the vision encoder's output (an image, or a whole video) and its budgeted items."""

    modality: str
    features: Tensor
    items: list[ItemSpec] = field(default_factory=list)
    # other per-row outputs of the encoder that must follow the kept rows, by output field: one tensor per
    # layer, each [rows, D] like ``features`` (Qwen3-VL's deepstack features)
    extras: dict[str, list[Tensor]] = field(default_factory=dict)
    # the encoder rows ``features`` was regrouped from, in order (InternVL: an image's tiles), where it is not one
    # entry of the encoder's output itself; tower signals are looked up per part
    parts: list[Tensor] = field(default_factory=list)


class Adapter:
    """Base class of the model-family adapters.

    An adapter knows one family's module paths, how its vision encoder output maps onto placeholder tokens, and
    how it numbers positions. It knows nothing about any pruning method.
    """

    family: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    # Class names accepted by this adapter (for the "unsupported model" error).
    model_class_names: ClassVar[tuple[str, ...]] = ()
    # Inputs that make the model run its vision encoder; cleared once features are handed over precomputed.
    raw_visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    mrope: ClassVar[bool] = False
    has_cls_token: ClassVar[bool] = True
    # Position of the [CLS] token in each view of the tower's output (None: the tower has none).
    cls_position: ClassVar[int | None] = 0
    # what [CLS] methods are told where has_cls_token is False
    no_cls_reason: ClassVar[str] = "towers have no [CLS] token"
    # The projector maps each tower token on its own (LLaVA's MLP), so features merged before it can be projected
    # (Adapter.project); False where it pools or merges patches (Qwen's 2x2 merger, Gemma 3's 4x4 pooling).
    per_token_projector: ClassVar[bool] = True
    # The family maps its tower's attention (every query row) onto the LLM's tokens: vision_attention,
    # vision_attention_segments and vision_row_values work (Stage.vision_received, Stage.vision_maps).
    tower_attention: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # ForConditionalGeneration holds the multimodal base model in `.model` next to `lm_head`; a bare base model
        # can be wrapped too.
        self.vlm: nn.Module = model.model if hasattr(model, "lm_head") else model
        self._forward_signature = inspect.signature(self.vlm.forward)
        # `past_key_values` up to transformers 5.23, `cache` from 5.24
        self.cache_parameter = cache_parameter(self._forward_signature)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_class_names

    # config.model_type values of the family (FLOPs work from a config alone)
    model_types: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        """The vision tower and projector of a full model config, for FLOPs (no weights needed)."""
        raise NotImplementedError(f"{cls.display_name or cls.family} has no FLOPs model")

    # -- module paths ------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        """The language model's last norm, applied to the last decoder layer's output before the LM head."""
        return self.language_model.norm

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    def layer_types(self) -> list[str]:
        """The attention type of every decoder layer (``"full_attention"``, ``"sliding_attention"``, ...); read once,
        as the engine asks for it per layer on every forward. Callers must not modify the list."""
        if self.__dict__.get("_layer_types") is None:
            declared = getattr(self.text_config, "layer_types", None)
            self._layer_types = list(declared) if declared else ["full_attention"] * len(self.decoder_layers)
        return self._layer_types

    def decoder_parts(self, layer: int) -> DecoderParts:
        """Decoder layer ``layer``'s pieces (Llama-style module names; families that differ override this)."""
        block = self.decoder_layers[layer]
        attention = block.self_attn
        return DecoderParts(
            attention=attention,
            query=attention.q_proj,
            key=attention.k_proj,
            input_norm=block.input_layernorm,
            mlp=block.mlp,
            layer_type=self.layer_types()[layer],
        )

    def attention_masks(
        self, hidden_states: Tensor, attention_mask: Tensor, cache: Any, layer: int, blocks: Tensor | None = None
    ) -> dict[str, Any]:
        """For a 2-D padding mask over ``cache``'s tokens plus ``hidden_states``' rows: the mask each attention type
        of the decoder needs, built as transformers builds it (``layer`` picks the cache layer to size it).
        ``blocks`` (``[B, rows]``, prefill only): the rows' bidirectional blocks (:meth:`bidirectional_blocks`);
        causal families have none."""
        return {
            layer_type: build_mask(
                layer_type, self.text_config, hidden_states, attention_mask, cache, self.mask_layer(layer, layer_type)
            )
            for layer_type in sorted(set(self.layer_types()))
        }

    def bidirectional_blocks(self, inputs: dict[str, Any], visual: Tensor) -> Tensor | None:
        """Per prompt slot (``[B, L]``), the block of tokens it attends to bidirectionally, -1 for causal-only
        slots; None for causal families (every slot). ``visual`` marks the placeholder slots."""
        return None

    def mask_layer(self, layer: int, layer_type: str) -> int:
        """The cache layer that sizes ``layer_type``'s mask for the layers from ``layer`` on: the first of that type
        (a sliding layer's cache keeps only its window, a full layer's everything)."""
        types = self.layer_types()
        return next((index for index in range(layer, len(types)) if types[index] == layer_type), layer)

    def rotary(self, hidden_states: Tensor, positions: Tensor, layer_type: str = "full_attention") -> tuple[Tensor, Tensor]:
        """(cos, sin) for ``positions`` in layers of ``layer_type``; here one table for every type (families with a
        table per type override this)."""
        rotary_positions, _ = self.split_positions(positions)
        return self.language_model.rotary_emb(hidden_states, rotary_positions)

    def follow_kept_rows(self, patch: Callable[[Any, str, Any], None], rows_now: Callable[[], Tensor | None]) -> None:
        """For families whose language model adds per-visual-token inputs inside its layer loop (Qwen3-VL's
        deepstack): patch that step with ``patch(owner, name, value)`` (undone at unwrap) so it follows the tokens
        an in-LLM stage kept. ``rows_now()`` gives, during a prefill, each current slot's slot in the sequence the
        language model received (``[B, L]``, -1 for padding), or None while nothing was dropped since."""

    # -- tokens ------------------------------------------------------------------------------------------------
    def visual_token_ids(self) -> dict[str, int]:
        return {"image": self.vlm.config.image_token_id}

    def placeholder_masks(
        self, input_ids: Tensor | None, inputs_embeds: Tensor | None, token_types: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``[B, L]`` masks of the placeholder tokens, per modality (from ids, or by embedding match as HF does).
        ``token_types``: the processor's ``mm_token_type_ids``, for families whose modalities share one id."""
        masks = {}
        for modality, token_id in self.visual_token_ids().items():
            if input_ids is not None:
                masks[modality] = input_ids == token_id
            else:
                embedding = self.vlm.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
                masks[modality] = (inputs_embeds == embedding).all(-1)
        return masks

    def input_placeholders(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """:meth:`placeholder_masks` of a model call's inputs."""
        return self.placeholder_masks(inputs.get("input_ids"), inputs.get("inputs_embeds"), inputs.get("mm_token_type_ids"))

    def placeholder_runs(self, inputs: dict[str, Any], modality: str = "image") -> list[tuple[int, int, int]]:
        """``(sample, first slot, length)`` of each run of consecutive ``modality`` placeholders, in prompt order."""
        mask = self.input_placeholders(inputs)[modality]
        runs = []
        for sample, row in enumerate(mask.cpu()):
            edges = torch.diff(torch.cat([torch.zeros(1), row.float(), torch.zeros(1)]))
            starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
            runs += [(sample, int(start), int(end - start)) for start, end in zip(starts, ends)]
        return runs

    def safe_pad_id(self) -> int:
        """A token id that is not a placeholder, for padding slots of a re-padded ``input_ids``."""
        pad = getattr(self.text_config, "pad_token_id", None)
        visual = set(self.visual_token_ids().values())
        if isinstance(pad, int) and pad not in visual and 0 <= pad < self.text_config.vocab_size:
            return pad
        return next(i for i in range(self.text_config.vocab_size) if i not in visual)

    # -- vision encoder ----------------------------------------------------------------------------------------
    # Methods of the multimodal base model that run the vision encoder; the engine observes these calls when a
    # method needs tower signals ([CLS] attention, pre-projector features, per-view budgets).
    encoder_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)

    def vision_depth(self) -> int:
        """Number of layers of the vision tower (0 when the family has no [CLS]-style tower)."""
        return 0

    def vision_feature_layer(self) -> int:
        """0-based index of the tower layer whose output feeds the projector."""
        return 0

    def vision_attention(self, layer: int) -> nn.Module:
        """The tower's attention module of ``layer`` (with ``q_proj``, ``k_proj``, ``num_heads``, ``scale``)."""
        raise NotImplementedError(f"{self.family} exposes no vision-tower attention")

    def vision_attention_segments(
        self, call: dict[str, Any], module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[list[tuple[Tensor, Tensor]], float]:
        """From the inputs of one call of :meth:`vision_attention`'s module during encoder call ``call``: the queries
        and keys (after any RoPE), ``[heads, T, head_dim]`` each, of every run of tower rows that attend to each
        other in full (a view; a frame of a dynamic-resolution image, its windows ignored), in the tower's row
        order, and the attention's scale."""
        raise NotImplementedError(f"{self.display_name or self.family} maps no tower attention onto its tokens")

    def vision_row_values(self, call: dict[str, Any], values: Tensor) -> Tensor:
        """One value per tower row (in the tower's order, every run of :meth:`vision_attention_segments`) laid out as
        :meth:`image_sources` indexes the call's tower output, ``[views, T]`` (values of rows merged into one token
        averaged)."""
        raise NotImplementedError(f"{self.display_name or self.family} maps no tower attention onto its tokens")

    def vision_pixel_patches(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, int]:
        """From the arguments of a call of :meth:`vision_tower`: the pixel patch each tower row embeds, ``[views, P, C,
        p, p]`` (as the tower receives them, normalised), and how many rows of each view come before them without
        pixels ([CLS]); :meth:`vision_row_values` lays the rows out (Stage.pixel_maps)."""
        raise NotImplementedError(f"{self.display_name or self.family} maps no pixel patches onto its tokens")

    def reducible_tower(self) -> tuple[nn.Module, int]:
        """The vision tower a ViT method (``evit``, ``tome``) may reduce inside this VLM, and how many of its blocks
        feed the features the VLM reads; a ValueError where the family's encoder output cannot take fewer rows."""
        from vtprune.core.registry import list_methods

        raise ValueError(
            f"ViT-side methods ({', '.join(list_methods('vit'))}) reduce the CLIP tower of LLaVA-1.5 only, not "
            f"{self.display_name}'s vision encoder; use an LLM-side method there (vtprune methods)"
        )

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        """For one encoder call: per image, each token's flat index ``view * T + position`` in the tower output
        (-1 where no view produced it), and ``T``; None when the family cannot say."""
        return None

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """The tower's hidden states that feed the projector, ``[views, T, D]``, from one encoder call."""
        return None

    def vision_tower(self) -> nn.Module:
        """The vision encoder module (its calls are counted for FLOPs reports)."""
        return self.vlm.vision_tower

    def tower_inputs(self, args: tuple, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """What one call of :meth:`vision_tower` encodes, per sequence: ``{"views": n}`` (fixed-size views) or
        ``{"grid": (t, h, w)}`` (patch grids)."""
        pixels = args[0] if args else kwargs["pixel_values"]
        return [{"views": int(pixels.shape[0])}]

    def display_image(self, inputs: dict[str, Any], index: int = 0) -> Tensor:
        """Image ``index`` as the tower saw it (its first view), ``[3, H, W]`` scaled to [0, 1] for display."""
        pixels = inputs["pixel_values"][index]
        image = pixels[0] if pixels.ndim == 4 else pixels  # LLaVA-NeXT: the base view
        return _to_unit_range(image.float())

    def resample_images(
        self, call: dict[str, Any], target: Callable[[int, int], tuple[int, int]]
    ) -> tuple[dict[str, Any], list[tuple[tuple[int, int], tuple[int, int]] | None]] | None:
        """The encoder call's arguments with each image resized to the token grid ``target(rows, cols)``, and per
        image ((rows, cols), (new rows, new cols)) or None where it stayed; None when the family cannot resample."""
        return None

    def project(self, features: Tensor) -> Tensor:
        """Features from before the projector mapped into the LLM's input space (for methods that merge there)."""
        raise NotImplementedError(f"{self.display_name or self.family} has no per-token projector")

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        """Run the vision encoder (+ projector) on ``inputs`` and return its outputs in placeholder order."""
        raise NotImplementedError

    # How the family's forward takes features in ``mm_encoder_outputs[modality].pooler_output``: "list" (one
    # tensor per image or video: LLaVA, Qwen) or "tensor" (all rows in one [N, D] tensor).
    encoder_output_layout: ClassVar[str] = "list"

    def encoder_outputs(
        self, features: dict[str, list[Tensor]], extras: dict[str, dict[str, list[list[Tensor]]]] | None = None
    ) -> dict[str, BaseModelOutputWithPooling]:
        """The ``mm_encoder_outputs`` argument that hands (kept) features to the model's forward. Kept images have
        different token counts, so the "tensor" layout is flat ``[N, D]``, never ``[images, tokens, D]``.
        ``extras[modality][field][layer]`` holds each chunk's kept rows of a per-row output field; the output
        carries it as ``field = [tuple(rows of each chunk) for each layer]`` (Qwen3-VL's deepstack layout)."""
        outputs = {}
        for modality, rows in features.items():
            pooled = torch.cat(list(rows)) if self.encoder_output_layout == "tensor" else list(rows)
            outputs[modality] = BaseModelOutputWithPooling(pooler_output=pooled)
            for name, per_layer in (extras or {}).get(modality, {}).items():
                outputs[modality][name] = [tuple(chunks) for chunks in per_layer]
        return outputs

    @staticmethod
    def encoder_output(inputs: dict[str, Any], modality: str, pixels_key: str, encode: Callable[[Tensor], Any]) -> Any:
        """The encoder output of ``modality``: handed in precomputed (``mm_encoder_outputs``, as ``generate`` does),
        else ``encode(pixels)``; None when the forward has no such input."""
        precomputed = (inputs.get("mm_encoder_outputs") or {}).get(modality)
        if precomputed is not None:
            return precomputed
        pixels = inputs.get(pixels_key)
        if pixels is None or pixels.numel() == 0:
            return None
        return encode(pixels)

    def encoder_rows(self, output: Any) -> list[Tensor]:
        """One ``[tokens, D]`` tensor per entry (:meth:`encoder_entries`) of an encoder call's output, the same tensor
        objects on every call (the engine keys what it noted about each by identity, and a stacked
        ``[videos, N, D]`` output would give new views each time)."""
        cached = output.__dict__.get("_vtprune_rows")
        if cached is None or cached[0] is not output.pooler_output:
            cached = (output.pooler_output, self.encoder_entries(output.pooler_output))
            object.__setattr__(output, "_vtprune_rows", cached)  # an attribute, not a field of the ModelOutput
        return cached[1]

    def encoder_entries(self, pooler_output: Tensor | list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        """The entries of an encoder output: one per image or video (or tile, crop: whatever the tower encodes on its
        own, where the family's output groups several, as SmolVLM's does per sample)."""
        return self.per_image_features(pooler_output)

    @staticmethod
    def per_image_features(pooler_output: Tensor | list[Tensor] | tuple[Tensor, ...], counts: list[int] | None = None) -> list[Tensor]:
        """One ``[tokens, D]`` tensor per image from an encoder output in either layout: a list, a stacked
        ``[images, tokens, D]`` tensor, or a flat ``[N, D]`` tensor split by ``counts`` (tokens per image)."""
        if isinstance(pooler_output, (list, tuple)):
            return list(pooler_output)
        if pooler_output.ndim == 3:
            return list(pooler_output.unbind(0))
        if counts is None or sum(counts) != pooler_output.shape[0]:
            raise ValueError(
                f"a flat encoder output of {pooler_output.shape[0]} rows needs the tokens of each image to split it, "
                f"got {counts}"
            )
        return list(pooler_output.split(counts))

    # -- positions ---------------------------------------------------------------------------------------------
    def prefill_positions(self, inputs: dict[str, Any], batch: int, length: int) -> Tensor:
        """Position ids of the full prompt exactly as the unwrapped model would use them (sequence last)."""
        given = inputs.get("position_ids")
        if given is not None:
            return given.expand(batch, -1) if given.ndim == 2 else given
        return torch.arange(length, device=self._device(inputs)).expand(batch, -1)

    def decode_positions(self, inputs: dict[str, Any], past_length: int, query_length: int, batch: int) -> Tensor:
        """Positions of tokens decoded after ``past_length`` original tokens when the caller passes none."""
        positions = torch.arange(past_length, past_length + query_length, device=self._device(inputs))
        return positions.expand(batch, -1)

    def split_positions(self, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """(positions for the rotary embedding, ``position_ids`` passed to each decoder layer)."""
        return positions, positions

    @staticmethod
    def _device(inputs: dict[str, Any]) -> torch.device:
        tensor = inputs.get("input_ids")
        return (tensor if tensor is not None else inputs["inputs_embeds"]).device

    # -- helpers for subclasses --------------------------------------------------------------------------------
    @staticmethod
    def call_with_supported(fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Call ``fn`` with the keyword arguments its signature accepts (families differ slightly)."""
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return fn(**kwargs)
        return fn(**{k: v for k, v in kwargs.items() if k in params})

    def bind_forward(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The multimodal base model's forward arguments as one flat dict, the cache under the name this
        transformers release uses whichever name the caller passed it under."""
        inputs = self.bind_call(self._forward_signature, args, kwargs)
        cache = get_cache(inputs)
        return set_cache(inputs, cache, self.cache_parameter) if cache is not None else inputs

    @staticmethod
    def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments by name, with ``**kwargs`` flattened in."""
        bound = signature.bind_partial(*args, **kwargs)
        flat: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                flat.update(value)
            else:
                flat[name] = value
        return flat


def whole_views(views: int, tokens: int) -> tuple[list[Tensor], int]:
    """:meth:`Adapter.image_sources` where every view of an encoder call is one entry of ``tokens`` tokens in
    raster order (Gemma 3's and PaliGemma's images, InternVL's tiles, SmolVLM's crops)."""
    return [torch.arange(view * tokens, (view + 1) * tokens) for view in range(views)], tokens


def tiled_chunks(tiles: list[Tensor], tiles_per_image: list[int]) -> list[VisualChunk]:
    """One image chunk per ``tiles_per_image`` consecutive square tiles (InternVL's tiles, SmolVLM's crops), its
    item one square grid per tile, tower signals looked up per tile."""
    chunks, first = [], 0
    for count in tiles_per_image:
        parts = tiles[first : first + count]
        per_tile = parts[0].shape[0]
        side = int(per_tile**0.5)
        grids = tuple(GridPart(tile * per_tile, side, side, side) for tile in range(count))
        chunks.append(VisualChunk("image", torch.cat(parts), [ItemSpec(0, count * per_tile, grids)], parts=list(parts)))
        first += count
    return chunks


def pixel_shuffle_groups(shuffle: Callable[[Tensor], Tensor], patches_per_side: int, flat: bool = False) -> Tensor:
    """The patches each pixel-shuffled token concatenates, ``[tokens, group]``, read off the model's own ``shuffle``
    applied to patch indices laid out as ``[1, side, side, 1]`` (InternVL), or ``[1, side * side, 1]`` if ``flat``
    (SmolVLM / Idefics3)."""
    index = torch.arange(patches_per_side**2, dtype=torch.float64)
    shuffled = shuffle(index.view(1, -1, 1) if flat else index.view(1, patches_per_side, patches_per_side, 1))
    return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


def _to_unit_range(image: Tensor) -> Tensor:
    """Per-channel min-max scaling of a normalised image, for display."""
    low = image.amin(dim=(1, 2), keepdim=True)
    high = image.amax(dim=(1, 2), keepdim=True)
    return (image - low) / (high - low).clamp(min=1e-6)
