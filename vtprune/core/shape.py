"""The shapes a VLM's FLOPs depend on: its language model (from any text config) and its vision tower and projector
(described by the family's adapter). ``vtprune.eval.flops`` counts with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LinearAttentionShape:
    """A Gated DeltaNet token mixer (Qwen3.5, Qwen3-Next: ``linear_attention`` layers), as transformers runs it.

    For ``queries`` new tokens (``keys`` - ``queries`` earlier ones live in its state), with d the LM width,
    K = ``key_heads`` x ``key_head_dim``, V = ``value_heads`` x ``value_head_dim``, H = ``value_heads``:

    * projections ``2 q d (2K + V)`` (``in_proj_qkv``) + ``2 q d V`` (``in_proj_z``, the output gate) +
      ``2 x 2 q d H`` (``in_proj_b``, ``in_proj_a``: one beta and one decay per value head) + ``2 q V d``
      (``out_proj``);
    * the causal depthwise conv1d over the 2K + V channels, ``2 (2K + V) k`` per output position (kernel k), with
      the output positions the reference kernels compute: ``max(q, k) + k - 1`` for a prompt (a cache pads it to
      at least k, then ``causal_conv1d_fn`` pads k - 1 on both sides and crops), ``q + 2k - 1`` for a longer
      continuation of a cached state, 2 for one decoded token (``causal_conv1d_update`` convolves the k cached
      positions and the new one without padding);
    * the gated delta rule (q and k heads repeated to H), in prefill in chunks of C = ``chunk``:
      ``ceil(q / C)`` chunks (the padded length), each ``2 x 2 H C^2 dk`` (``k_beta K^T`` and ``Q K^T`` within the
      chunk) + ``2 H C (3 dk dv + C dv)`` (reading the state twice, the intra-chunk ``A V`` and the state update);
      in decode the recurrent step's three state products ``S^T k``, ``S^T q`` and ``k delta^T``, ``3 x 2 H dk dv``.

    Not counted: the two unit-triangular solves per chunk (``C (C - 1) (dk + dv)`` per head, about 0.1 % of a
    full-size layer; FlopCounterMode has no formula for ``linalg.solve_triangular``), the decays, norms and gates
    (elementwise, as everywhere in this model). The decode step's products are written as broadcast multiplies and
    sums in transformers' reference code, so FlopCounterMode misses them; they are counted here (the fused kernels
    run them as such), like attention over the KV cache for a softmax layer."""

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    # torch_chunk_gated_delta_rule's chunk_size (transformers' default; not a config field)
    chunk: int = 64

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_head_dim + self.value_heads * self.value_head_dim

    def flops(self, hidden: int, queries: int, keys: int) -> int:
        value_dim, k = self.value_heads * self.value_head_dim, self.conv_kernel
        heads, dk, dv, c = self.value_heads, self.key_head_dim, self.value_head_dim, self.chunk
        projections = 2 * queries * hidden * (self.conv_channels + value_dim + 2 * heads)  # in_proj_qkv, _z, _b, _a
        projections += 2 * queries * value_dim * hidden  # out_proj
        if queries == 1 and keys > 1:  # decode: causal_conv1d_update, the recurrent rule
            return projections + 2 * self.conv_channels * k * 2 + 3 * 2 * heads * dk * dv
        conv_input = max(queries, k) if keys == queries else k + queries
        conv = 2 * self.conv_channels * k * (conv_input + k - 1)
        chunks = -(-queries // c)
        rule = chunks * (2 * 2 * heads * c * c * dk + 2 * heads * c * (3 * dk * dv + c * dv))
        return projections + conv + rule


@dataclass(frozen=True)
class ExpertsShape:
    """A sparse MoE block in place of the dense MLP (Qwen3.5-MoE): per token the router ``2 d E``, ``per_token``
    routed experts of three matrices ``per_token x 3 x 2 d m`` and, where ``shared_intermediate`` > 0, a shared
    expert ``3 x 2 d m_s`` with its one-output gate ``2 d``."""

    experts: int
    per_token: int
    intermediate: int
    shared_intermediate: int = 0

    def flops(self, hidden: int, tokens: int) -> int:
        total = 2 * tokens * hidden * self.experts + self.per_token * 3 * 2 * tokens * hidden * self.intermediate
        if self.shared_intermediate:
            total += 3 * 2 * tokens * hidden * self.shared_intermediate + 2 * tokens * hidden
        return total


@dataclass(frozen=True)
class LanguageShape:
    """A decoder-only LM. Each layer is a token mixer and an MLP. The mixer is softmax attention (q/k/v/o
    projections, ``Q K^T`` and ``A V`` over every key), or, in the layers ``linear_attention`` marks, a Gated
    DeltaNet (:class:`LinearAttentionShape`); ``gated_query``: ``q_proj`` emits ``[query | gate]`` per head,
    twice the query width (Qwen3.5's gated attention). The MLP is gated (three matrices of ``intermediate``) or,
    with ``experts``, a sparse MoE block (:class:`ExpertsShape`)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    # per layer: the sliding window of a sliding-attention layer, 0 for full attention (Gemma 3 mixes both)
    windows: tuple[int, ...] = ()
    # per layer: True where the mixer is linear attention (``linear``), not softmax attention (Qwen3.5: 3 of 4)
    linear_attention: tuple[bool, ...] = ()
    linear: LinearAttentionShape | None = None
    gated_query: bool = False
    experts: ExpertsShape | None = None

    def decode_keys(self, layer: int, tokens: int) -> int:
        """Keys a decoded token attends to in ``layer`` when ``tokens`` are cached (with itself): a sliding layer's
        cache keeps only its window."""
        window = self.windows[layer] if layer < len(self.windows) else 0
        return min(tokens, window) if window else tokens

    def is_linear(self, layer: int) -> bool:
        return layer < len(self.linear_attention) and self.linear_attention[layer]

    def layer_flops(self, queries: int, keys: int, layer: int | None = None) -> float:
        """Decoder layer ``layer`` for ``queries`` new tokens attending to ``keys`` tokens (cache + new; a linear
        layer keeps ``keys`` - ``queries`` of them in its state). ``layer=None``: the mean layer, so that
        ``layers x`` it is the whole stack at one token count (where all layers are alike, any layer)."""
        if layer is None and any(self.linear_attention):
            return sum(self.layer_flops(queries, keys, index) for index in range(self.layers)) / self.layers
        d, hd = self.hidden, self.head_dim
        if layer is not None and self.is_linear(layer):
            mixer = self.linear.flops(d, queries, keys)
        else:
            query_width = self.heads * hd * (2 if self.gated_query else 1)
            projections = 2 * queries * d * query_width + 2 * queries * (self.heads * hd) * d  # q (+ gate), o
            projections += 2 * queries * d * (self.kv_heads * hd) * 2  # k, v
            attention = 2 * 2 * queries * keys * self.heads * hd  # Q K^T and A V
            mixer = projections + attention
        if self.experts is not None:
            mlp = self.experts.flops(d, queries)
        else:
            mlp = 3 * 2 * queries * d * self.intermediate  # gate, up, down
        return float(mixer + mlp)

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
    """A decoder-only LM's shape from its text config (Gated DeltaNet layers from ``layer_types`` and the
    ``linear_*`` fields; a family's adapter adds what the config does not say, as gated queries)."""
    heads = text.num_attention_heads
    types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None) or 0
    linear = None
    if "linear_attention" in types:
        linear = LinearAttentionShape(
            key_heads=text.linear_num_key_heads,
            value_heads=text.linear_num_value_heads,
            key_head_dim=text.linear_key_head_dim,
            value_head_dim=text.linear_value_head_dim,
            conv_kernel=text.linear_conv_kernel_dim,
        )
    return LanguageShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 0,  # none on MoE-only configs (Qwen3.5-MoE)
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        windows=tuple(window if layer_type == "sliding_attention" else 0 for layer_type in types),
        linear_attention=tuple(layer_type == "linear_attention" for layer_type in types) if linear else (),
        linear=linear,
    )
