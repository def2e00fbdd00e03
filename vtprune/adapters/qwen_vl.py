"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution ViT (no [CLS]), 2x2 patch merger, decoder with M-RoPE.

Each image is one item whose tokens are its merged patches in raster order on a ``(h / 2) x (w / 2)`` grid; a
video is given as one item spec per temporal slice (frame), which the engine joins into one item per video
(``budget_unit="video"``, the default) or leaves per frame (``"frame"``). Positions are the 3-D M-RoPE ids
computed on the full prompt (as the model does) and sliced, so kept tokens keep their (t, h, w) positions and
``rope_deltas`` stay valid while decoding. Because an image advances the text position by its grid extent, not by
its token count, dropping image tokens leaves nothing to renumber: ``positions="renumber"`` behaves as ``"keep"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.vision_utils import get_vision_window_index

from vtprune.core.adapter import Adapter, ItemSpec, VisualChunk, _to_unit_range
from vtprune.core.attention import apply_rotary
from vtprune.core.compat import cache_parameter
from vtprune.core.layout import GridPart
from vtprune.core.shape import VisionShape


class QwenVLAdapter(Adapter):
    family = "qwen_vl"
    display_name = "Qwen2-VL / Qwen2.5-VL"
    model_class_names = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )
    model_types = ("qwen2_vl", "qwen2_5_vl")
    raw_visual_inputs = ("pixel_values", "pixel_values_videos")
    encoder_methods = ("get_image_features", "get_video_features")
    mrope = True
    has_cls_token = False
    cls_position = None
    per_token_projector = False
    tower_attention = True

    @classmethod
    def vision_shape(cls, config: Any) -> VisionShape:
        vision = config.vision_config
        if config.model_type == "qwen2_vl":  # GELU MLP of mlp_ratio x embed_dim, full attention everywhere
            hidden, intermediate, out = vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio), vision.hidden_size
            windowed: dict[str, Any] = {}
        else:  # Qwen2.5-VL: gated MLP, windowed attention outside fullatt_block_indexes
            hidden, intermediate, out = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
            windowed = {"window": vision.window_size, "full_attention_layers": tuple(vision.fullatt_block_indexes),
                        "gated_mlp": True}  # fmt: skip
        merged = hidden * vision.spatial_merge_size**2
        return VisionShape(
            encoder_input="grid",
            layers=vision.depth,
            hidden=hidden,
            intermediate=intermediate,
            patch=vision.patch_size,
            temporal_patch=vision.temporal_patch_size,
            merge=vision.spatial_merge_size,
            projector_in=merged,
            projector_hidden=merged,
            projector_out=out,
            **windowed,
        )

    def visual_token_ids(self) -> dict[str, int]:
        config = self.vlm.config
        return {"image": config.image_token_id, "video": config.video_token_id}

    def _chunks(self, inputs: dict[str, Any], modality: str) -> list[VisualChunk]:
        grid_thw = inputs.get(f"{modality}_grid_thw")
        encode = self.vlm.get_image_features if modality == "image" else self.vlm.get_video_features
        pixels_key = "pixel_values" if modality == "image" else "pixel_values_videos"
        output = self.encoder_output(inputs, modality, pixels_key, lambda pixels: encode(pixels, grid_thw, return_dict=True))
        if output is None:
            return []
        features = self.encoder_rows(output)
        if grid_thw is not None:
            merge = self.vlm.config.vision_config.spatial_merge_size
            grids = [(t, h // merge, w // merge) for t, h, w in grid_thw.tolist()]
        else:  # generate() encodes images before prefill and drops the grids: read them off the M-RoPE positions
            grids = self._grids_from_positions(inputs, modality, [rows.shape[0] for rows in features])
        chunks = []
        for index, (rows, grid) in enumerate(zip(features, grids, strict=True)):
            if grid is None:
                items = [ItemSpec(0, rows.shape[0])]
            else:  # one item per temporal slice (a still image has one)
                frames, grid_h, grid_w = grid
                per_frame, part = grid_h * grid_w, (GridPart(0, grid_h, grid_w, grid_w),)
                items = [ItemSpec(t * per_frame, per_frame, part) for t in range(frames)]
            chunks.append(VisualChunk(modality, rows, items, self._chunk_extras(output, index)))
        return chunks

    def _chunk_extras(self, output: Any, index: int) -> dict[str, list[Tensor]]:
        """Per-row encoder outputs besides the features that must follow entry ``index``'s kept rows (none here)."""
        return {}

    def _grids_from_positions(
        self, inputs: dict[str, Any], modality: str, counts: list[int]
    ) -> list[tuple[int, int, int] | None]:
        """(frames, rows, cols) of each image from the distinct t / h / w positions of its tokens."""
        positions = inputs.get("position_ids")
        if positions is None or positions.ndim != 3:
            return [None] * len(counts)
        mask = self.input_placeholders(inputs)[modality]
        rows, cols = mask.nonzero(as_tuple=True)
        grids: list[tuple[int, int, int] | None] = []
        start = 0
        for count in counts:
            thw = positions[-3:, rows[start : start + count], cols[start : start + count]]
            grid = tuple(int(axis.unique().numel()) for axis in thw)
            grids.append(grid if grid[0] * grid[1] * grid[2] == count else None)
            start += count
        return grids

    def vision_tower(self) -> nn.Module:
        return self.vlm.visual

    def vision_depth(self) -> int:
        return len(self.vlm.visual.blocks)

    def vision_feature_layer(self) -> int:
        return self.vision_depth() - 1  # the merger reads the last block's output

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vlm.visual.blocks[layer].attn

    def vision_attention_segments(
        self, call: dict[str, Any], module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[list[tuple[Tensor, Tensor]], float]:
        """Every frame of every image in full (Qwen2.5-VL's windows ignored, as HiPrune's authors compute it)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        rows, width = hidden.shape
        # the fused projection's query and key rows only (the values are not needed)
        bias = module.qkv.bias[: 2 * width] if module.qkv.bias is not None else None
        qk = F.linear(hidden, module.qkv.weight[: 2 * width], bias)
        qk = qk.reshape(rows, 2, module.num_heads, -1).permute(1, 2, 0, 3).float()
        cos, sin = cos.float()[None], sin.float()[None]
        queries, keys = (apply_rotary(x[None], cos, sin)[0] for x in (qk[0], qk[1]))
        # a frame's rows stay together in the window order, and frames follow one another
        lengths = [h * w for t, h, w in self._call_grid(call).tolist() for _ in range(t)]
        return list(zip(queries.split(lengths, dim=1), keys.split(lengths, dim=1))), module.scaling

    def vision_row_values(self, call: dict[str, Any], values: Tensor) -> Tensor:
        return self._merged_rows(call, values)[None]

    def _merged_rows(self, call: dict[str, Any], rows: Tensor) -> Tensor:
        """Per merged token (raster order, the call's images one after another), the mean of the tower rows it
        merges; the tower holds them in merge groups, Qwen2.5-VL's reordered into windows."""
        vision = self.vlm.config.vision_config
        groups = rows.view(-1, vision.spatial_merge_size**2, *rows.shape[1:])
        if hasattr(vision, "window_size"):  # Qwen2.5-VL's tower runs on windows and reorders its tokens
            window_index, _ = get_vision_window_index(
                self._call_grid(call), vision.spatial_merge_size, vision.window_size, vision.patch_size
            )
            groups = groups[torch.argsort(window_index.to(groups.device))]
        return groups.mean(1)

    def tower_inputs(self, args: tuple, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return [{"grid": tuple(row)} for row in grid.tolist()]

    def display_image(self, inputs: dict[str, Any], index: int = 0) -> Tensor:
        vision = self.vlm.config.vision_config
        grids = inputs["image_grid_thw"].tolist()
        start = sum(t * h * w for t, h, w in grids[:index])
        t, height, width = grids[index]
        rows = inputs["pixel_values"][start : start + t * height * width]
        image = _unpatchify(rows, height, width, vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size)
        return _to_unit_range(image.float())

    @staticmethod
    def _call_grid(call: dict[str, Any]) -> Tensor | None:
        grid = call.get("image_grid_thw")
        return grid if grid is not None else call.get("video_grid_thw")

    def image_sources(self, call: dict[str, Any], output: Any) -> tuple[list[Tensor], int] | None:
        # No [CLS] and no views: the whole call is one "view" of its merged tokens, in output order.
        grid = self._call_grid(call)
        if grid is None:
            return None
        counts = (grid.prod(-1) // self.vlm.config.vision_config.spatial_merge_size**2).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [torch.arange(start, start + count) for start, count in zip(starts, counts)], sum(counts)

    def encoder_states(self, call: dict[str, Any], output: Any) -> Tensor | None:
        """The last ViT block's output before the merger, averaged over each merged group of patches (as MMTok
        does), back in raster order for Qwen2.5-VL's window attention."""
        hidden, grid = output.last_hidden_state, self._call_grid(call)
        if hidden is None or grid is None:
            return None
        return self._merged_rows(call, hidden)[None]

    def resample_images(
        self, call: dict[str, Any], target: Callable[[int, int], tuple[int, int]]
    ) -> tuple[dict[str, Any], list[tuple[tuple[int, int], tuple[int, int]] | None]] | None:
        """Undo the processor's patchify, resize each still image to ``target``'s merged grid with bicubic
        antialiased interpolation (normalised pixels; the normalisation is affine, so this equals resizing first),
        and patchify again with the processor's own code. Video frames are left as they are."""
        grid, pixels = call.get("image_grid_thw"), call.get("pixel_values")
        if grid is None or pixels is None:
            return None
        vision = self.vlm.config.vision_config
        merge, patch, frames = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        rows_out, grids_out, changes, start = [], [], [], 0
        for t, height, width in grid.tolist():
            count = t * height * width
            rows = pixels[start : start + count]
            start += count
            new = target(height // merge, width // merge) if t == 1 else (height // merge, width // merge)
            if t != 1 or new == (height // merge, width // merge):
                rows_out.append(rows)
                grids_out.append([t, height, width])
                changes.append(None)
                continue
            image = _unpatchify(rows, height, width, merge, patch, frames)
            size = (new[0] * merge * patch, new[1] * merge * patch)
            resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True)[0]
            rows_out.append(_patchify(resized.to(rows.dtype), merge, patch, frames))
            grids_out.append([1, new[0] * merge, new[1] * merge])
            changes.append(((height // merge, width // merge), new))
        call = dict(call)
        call["pixel_values"] = torch.cat(rows_out)
        call["image_grid_thw"] = torch.tensor(grids_out, dtype=grid.dtype, device=grid.device)
        return call, changes

    def encode(self, inputs: dict[str, Any]) -> list[VisualChunk]:
        return self._chunks(inputs, "image") + self._chunks(inputs, "video")

    def prefill_positions(self, inputs: dict[str, Any], batch: int, length: int) -> Tensor:
        given = inputs.get("position_ids")
        if given is not None:
            return given[None].expand(3, -1, -1) if given.ndim == 2 else given
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = torch.empty(batch, length, 0, device=self._device(inputs))
        compute = self.vlm.compute_3d_position_ids
        positions = self.call_with_supported(
            compute,
            input_ids=inputs.get("input_ids"),
            inputs_embeds=embeds,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
            **{cache_parameter(compute): None},  # the full prompt, as if nothing were cached
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
        )
        if positions is None:  # what the text model falls back to
            positions = torch.arange(length, device=embeds.device).view(1, 1, -1).expand(3, batch, -1)
        return positions

    def decode_positions(self, inputs: dict[str, Any], past_length: int, query_length: int, batch: int) -> Tensor:
        positions = super().decode_positions(inputs, past_length, query_length, batch)[None].expand(3, -1, -1)
        deltas = self.vlm.rope_deltas
        if deltas is not None:
            positions = positions + deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(positions.device)
        return positions

    def split_positions(self, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        # generate() passes [4, B, L]: text positions (used by FlashAttention's packing check) + the 3 M-RoPE axes.
        if positions.shape[0] == 4:
            return positions[1:], positions[0]
        return positions, None


def _unpatchify(rows: Tensor, height: int, width: int, merge: int, patch: int, frames: int) -> Tensor:
    """An image ``[C, height * patch, width * patch]`` from the processor's flattened patches (first temporal copy)."""
    channels = rows.shape[-1] // (frames * patch * patch)
    blocks = rows.view(height // merge, width // merge, merge, merge, channels, frames, patch, patch)[..., 0, :, :]
    # [h/m, w/m, m, m, C, p, p] -> [C, h/m, m, p, w/m, m, p]
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, height * patch, width * patch)


def _patchify(image: Tensor, merge: int, patch: int, frames: int) -> Tensor:
    """The processor's layout of an image ``[C, H, W]``: ``[H/p * W/p, C * frames * p * p]`` (the Qwen2-VL image
    processor's ``patchify``, which duplicates a still image over the temporal patch)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
        Qwen2VLImageProcessor,
    )

    patches, _, _ = Qwen2VLImageProcessor.patchify(None, image[None], patch, merge, frames)
    return patches[0]
