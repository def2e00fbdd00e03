"""SmolVLM / Idefics3 adapter: the per-sample encoder output is split into crops and the crops regrouped into images
(the global crop closes each), and Idefics3 shares the adapter. (Every method, generate, padding and the in-LLM
stages are covered by the cross-family tests.)"""

from __future__ import annotations

import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, make_batch, samples_for, tiny_model


def test_crops_are_regrouped_into_images_closed_by_their_global_crop():
    model = tiny_model("smolvlm")
    batch = make_batch(model, samples_for("smolvlm"))  # 1 crop; 2 + global; 4 + global
    with vtprune.wrap(model, "random", keep=5) as pruning:
        model(**batch)
    record = pruning.last
    assert [(i["sample"], i["num_tokens"]) for i in record.items] == [(0, 16), (1, 48), (1, 80)]
    assert record.item_grids[1] == [(0, 4, 4, 4), (16, 4, 4, 4), (32, 4, 4, 4)]  # one 4 x 4 grid per crop
    assert [k.numel() for k in record.stages[0].kept_per_item] == [5, 5, 5]  # the budget is per image


def test_tower_features_are_the_means_of_each_tokens_patch_group():
    model = tiny_model("smolvlm")
    batch = make_batch(model, [[3, Image((32, 64)), 4]])
    output = model.model.get_image_features(batch["pixel_values"])
    states = vtprune.adapter_for(model).encoder_states({}, output)
    hidden = output.last_hidden_state  # [crops, 8 x 8 patches, D]
    assert states.shape == (3, 16, hidden.shape[-1])
    assert_close(states[1, 5], hidden[1, [18, 19, 26, 27]].mean(0))  # token (1, 1): patch rows 2-3, columns 2-3


def test_single_crop_images_side_by_side_are_items_of_their_own():
    """Video frames and images without splitting are single global crops."""
    model = tiny_model("smolvlm")
    batch = make_batch(model, [[3, Image(), 1, Image(), 2, Image(), 4]])
    with vtprune.wrap(model, "random", keep=4) as pruning:
        model(**batch)
    assert [i["num_tokens"] for i in pruning.last.items] == [16, 16, 16]


def test_embedded_prompts_without_tags_budget_each_crop():
    model = tiny_model("smolvlm")
    batch = make_batch(model, [[2, Image((32, 64)), 3]])
    embeds = model.get_input_embeddings()(batch.pop("input_ids"))
    with vtprune.wrap(model, "random", keep=2) as pruning:
        model(**batch, inputs_embeds=embeds)
    assert [i["num_tokens"] for i in pruning.last.items] == [16, 16, 16]


def test_idefics3_is_served_by_the_same_adapter():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    smol = tiny_model("smolvlm")
    torch.manual_seed(0)
    config = Idefics3Config(
        vision_config=smol.config.vision_config.to_dict(), text_config=smol.config.text_config.to_dict(),
        image_token_id=smol.config.image_token_id, scale_factor=2,
    )  # fmt: skip
    model = Idefics3ForConditionalGeneration(config).eval()
    batch = make_batch(smol, samples_for("smolvlm")[:2])  # same prompt layout
    dense = model(**batch).logits
    with vtprune.wrap(model, "random", keep=1.0):
        assert_close(model(**batch).logits, dense)
    with vtprune.wrap(model, "fastv", keep=3) as pruning:
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert type(vtprune.adapter_for(model)).__name__ == "SmolVLMAdapter"
    assert [k.numel() for k in pruning.last.stages[0].kept_per_item] == [3, 3, 3]
