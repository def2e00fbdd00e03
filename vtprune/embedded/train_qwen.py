"""Train the embedded model's Qwen2-VL twin: the same digit-grid task, data and recipe as the LLaVA
(:mod:`vtprune.embedded.train`), in a real ``Qwen2VLForConditionalGeneration``: a ViT with 2D rotary positions
and no [CLS], a 2 x 2 patch merger as the projector, and a Qwen2 decoder with M-RoPE.

    python -m vtprune.embedded.train_qwen [--out vtprune/embedded/digits-qwen2-vl] [--seed 0] [--threads 2]

Sizes: 64 x 64 px images in 4 px patches (16 x 16 = 256 patches in the tower), merged 2 x 2 into the same 64
visual tokens as the LLaVA's; decoder 8 x 192 with 4 heads of 48, ``mrope_section`` [8, 8, 8] (t, h, w).

What differs from the LLaVA's recipe, and why (ours):

* The tower learns each patch's grid row and column too. A CLIP tower has absolute position embeddings; this one
  has only relative (rotary) positions, and the decoder's M-RoPE gives an image's columns almost no rotation at
  the frequencies Qwen2-VL assigns them (the lowest ones). So, as in the LLaVA, the place travels in the tokens'
  content, and the LLM looks cells up by content.
* Dropped image tokens keep their (t, h, w) positions: vtprune never renumbers M-RoPE positions (an image
  advances the text position by its grid extent, not its token count), so there is no second convention to train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.embedded.train import (
    CHAT_TEMPLATE,
    GRID,
    IMAGE_SIZE,
    INIT_STD,
    SPECIALS,
    Family,
    vocabulary,
    word_tokenizer,
)
from vtprune.embedded.train import main as train_main

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "digits-qwen2-vl"
PATCH, MERGE = 4, 2  # 16 x 16 patches merged 2 x 2: 64 visual tokens, each 8 x 8 px as in the LLaVA
QWEN_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}  # fmt: skip
IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"
# the first token ids: the LLaVA's specials without its <image>, then Qwen's vision tokens
SPECIAL_WORDS = [w for w in SPECIALS if w != "<image>"] + list(QWEN_SPECIALS.values())


def build_processor() -> Any:
    """Word-level tokenizer (the LLaVA's words, Qwen's vision tokens) + Qwen2-VL's image processor at 64 px + the
    LLaVA's one-turn chat template with Qwen's image markers."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = word_tokenizer(SPECIAL_WORDS + vocabulary()[len(SPECIALS) :], QWEN_SPECIALS)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    sizes = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, min_pixels=pixels, max_pixels=pixels),
        # never trained on video; frames are taken at the images' size
        video_processor=Qwen2VLVideoProcessor(**sizes, size={"shortest_edge": pixels, "longest_edge": pixels}),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE.replace("<image>", IMAGE_TEXT),
    )  # fmt: skip


def build_model(
    vocab_size: int, seed: int = 0, text_layers: int = 8, vision_layers: int = 5, text_width: int = 192,
    text_intermediate: int = 512,
) -> nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = {name: i for i, name in enumerate(SPECIAL_WORDS)}
    heads = 4
    text = dict(
        hidden_size=text_width, intermediate_size=text_intermediate, num_hidden_layers=text_layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=INIT_STD, tie_word_embeddings=True,
        # 24 rotary pairs per head: t, h and w take 8 each, highest frequencies first, as Qwen2-VL splits them
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 8, 8]},
    )  # fmt: skip
    vision = dict(
        depth=vision_layers, embed_dim=128, hidden_size=text_width, mlp_ratio=4, num_heads=heads, in_channels=3,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
    )  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def merged_patch_cells() -> Tensor:
    """The grid cell of each tower patch in the order Qwen2-VL's processor lays them out: merge windows in raster
    order, each window's 2 x 2 patches in raster order inside it."""
    side = IMAGE_SIZE // PATCH // MERGE
    per_cell = GRID.cell // PATCH
    window, inner = torch.arange(side), torch.arange(MERGE)
    rows = (window[:, None, None, None] * MERGE + inner[None, None, :, None]).expand(side, side, MERGE, MERGE)
    cols = (window[None, :, None, None] * MERGE + inner[None, None, None, :]).expand(side, side, MERGE, MERGE)
    return ((rows // per_cell) * GRID.cols + cols // per_cell).reshape(-1)


class QwenFamily(Family):
    """The Qwen2-VL twin: patches of the tower (no [CLS]) and merged tokens come flattened over the batch; the
    tower also learns each patch's grid row and column (see the module docstring); M-RoPE positions."""

    name: ClassVar[str] = "qwen2_vl"
    default_out: ClassVar[Path] = DEFAULT_OUT
    image_text: ClassVar[str] = IMAGE_TEXT
    has_cls: ClassVar[bool] = False
    tower_features: ClassVar[tuple[str, ...]] = ("row", "col", "count", "left")
    renumbers: ClassVar[bool] = False
    # its tower costs 4x the LLaVA's per step (256 patches, not 65), so fewer tower and LLM steps fit 40 minutes
    schedule: ClassVar[dict[str, int]] = {"tower_steps": 700, "steps": 1250, "symbolic_steps": 850}

    def build_processor(self) -> Any:
        return build_processor()

    def build_model(self, vocab_size: int, seed: int, **sizes: int) -> nn.Module:
        return build_model(vocab_size, seed, **sizes)

    def tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def tower_width(self, model: nn.Module) -> int:
        return model.config.vision_config.embed_dim

    def feature_layer(self, model: nn.Module) -> nn.Module:
        return model.model.visual.blocks[-1]

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.visual.merger

    def per_image(self, values: Tensor, images: int) -> Tensor:
        values = values[0] if isinstance(values, tuple) else values
        return values.reshape(images, -1, values.shape[-1])

    def tower_cells(self) -> Tensor:
        return merged_patch_cells()

    def pixel_inputs(self, processor: Any, images: list[Any]) -> dict[str, Tensor]:
        out = processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def run_tower(self, model: nn.Module, pixels: dict[str, Tensor]) -> None:
        model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])

    def encode(self, model: nn.Module, inputs: dict[str, Tensor]) -> None:
        self.run_tower(model, inputs)

    def positions(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        image_id = model.config.image_token_id
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=(inputs["input_ids"] == image_id).int(),
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        )  # fmt: skip
        return positions


QWEN = QwenFamily()


def main() -> None:
    train_main(QWEN)


if __name__ == "__main__":
    main()
