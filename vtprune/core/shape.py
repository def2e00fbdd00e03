"""The shapes a VLM's FLOPs depend on: its language model (from any text config) and its vision tower and projector
(described by the family's adapter). ``vtprune.eval.flops`` counts with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LanguageShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    # per layer: the sliding window of a sliding-attention layer, 0 for full attention (Gemma 3 mixes both)
    windows: tuple[int, ...] = ()

    def decode_keys(self, layer: int, tokens: int) -> int:
        """Keys a decoded token attends to in ``layer`` when ``tokens`` are cached (with itself): a sliding layer's
        cache keeps only its window."""
        window = self.windows[layer] if layer < len(self.windows) else 0
        return min(tokens, window) if window else tokens

    def layer_flops(self, queries: int, keys: int) -> float:
        """One decoder layer for ``queries`` new tokens attending to ``keys`` tokens (cache + new)."""
        d, hd = self.hidden, self.head_dim
        projections = 2 * queries * d * (self.heads * hd) * 2 + 2 * queries * d * (self.kv_heads * hd) * 2  # q, o + k, v
        attention = 2 * 2 * queries * keys * self.heads * hd  # Q K^T and A V
        mlp = 3 * 2 * queries * d * self.intermediate  # gate, up, down
        return float(projections + attention + mlp)

    def lm_head_flops(self, rows: int) -> float:
        return float(2 * rows * self.hidden * self.vocab)


@dataclass(frozen=True)
class VisionShape:
    """A vision tower and its projector, as its family's adapter describes them (``Adapter.vision_shape``).

    ``encoder_input``: what one image's encoder input is, ``"views"`` (fixed-size square views of ``image_size``
    pixels; ``fixed_views`` per image when the family always takes that many, 0 when it depends on the image) or
    ``"grid"`` (a (t, h, w) patch grid); ``cls_token``: each view carries one; ``gated_mlp``: three MLP matrices;
    ``window`` > 0: layers outside ``full_attention_layers`` attend within windows of that many pixels."""

    encoder_input: str
    layers: int
    hidden: int
    intermediate: int
    patch: int
    image_size: int = 0
    temporal_patch: int = 1
    merge: int = 1
    window: int = 0
    full_attention_layers: tuple[int, ...] = ()
    projector_in: int = 0
    projector_hidden: int = 0
    projector_out: int = 0
    cls_token: bool = False
    gated_mlp: bool = False
    fixed_views: int = 0
    # identical projectors run on the same rows (Qwen3-VL: the final merger plus one per deepstack block)
    projectors: int = 1
    # rows per view the projector runs on when it pools patches first (Gemma 3: 256); 0 = every patch
    projected_per_view: int = 0
    # (in, out) of each projector matrix per projected row, where it is not projector_in -> hidden -> out
    # (Mistral 3: its 2x2 patch merger, then two linear layers)
    projector_layers: tuple[tuple[int, int], ...] = ()

    def tower_flops(
        self,
        sequences: list[int],
        windows: list[int] | None = None,
        block_rows: list[list[int]] | None = None,
        embedded: int | None = None,
    ) -> float:
        """The tower on sequences of these lengths (one per view / image; tokens per sequence incl. [CLS]).
        ``block_rows`` (layers + 1 lists) where a ViT method reduced rows inside the tower: the lengths entering
        each block, then leaving the last; block l's attention runs on ``block_rows[l]`` and, as the reduction sits
        between attention and MLP, its MLP on ``block_rows[l + 1]``. ``embedded``: patches the patch embedding ran
        on, where it ran on padded images (Pixtral embeds the batch's padded canvas, then crops)."""
        patches = sum(sequences) - (len(sequences) if self.cls_token else 0)
        patches = embedded if embedded is not None else patches
        total = 2 * patches * 3 * self.temporal_patch * self.patch**2 * self.hidden  # patch embedding
        mlp_matrices = 3 if self.gated_mlp else 2
        rows = block_rows or [sequences] * (self.layers + 1)
        for layer in range(self.layers):
            attended, mlp_tokens = rows[layer], sum(rows[layer + 1])
            total += 2 * sum(attended) * self.hidden * self.hidden * 4
            total += mlp_matrices * 2 * mlp_tokens * self.hidden * self.intermediate
            windowed = self.window > 0 and layer not in self.full_attention_layers and windows is not None
            total += sum(4 * s * s * self.hidden for s in (windows if windowed else attended))
        return float(total)

    def window_lengths(self, grids: list[tuple[int, int, int]]) -> list[int]:
        """Attention window lengths of the windowed layers for these (t, h, w) patch grids (Qwen2.5-VL's rule)."""
        from transformers.vision_utils import get_vision_window_index

        _, cumulative = get_vision_window_index(torch.tensor(grids), self.merge, self.window, self.patch)
        cumulative = torch.unique_consecutive(torch.as_tensor(cumulative))
        return (cumulative[1:] - cumulative[:-1]).tolist()

    def projector_flops(self, tokens: int) -> float:
        """The projector (LLaVA: per image token) or the patch merger (Qwen: per merged token), times
        ``projectors``."""
        layers = self.projector_layers or ((self.projector_in, self.projector_hidden), (self.projector_hidden, self.projector_out))
        return float(self.projectors * sum(2 * tokens * rows_in * rows_out for rows_in, rows_out in layers))


@dataclass(frozen=True)
class ModelShape:
    family: str
    language: LanguageShape
    vision: VisionShape


def language_shape(text: Any) -> LanguageShape:
    """A decoder-only LM's shape from its text config."""
    heads = text.num_attention_heads
    types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None) or 0
    return LanguageShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        windows=tuple(window if layer_type == "sliding_attention" else 0 for layer_type in types),
    )
