"""ViT methods (EViT, ToMe) reducing LLaVA-1.5's CLIP tower inside the VLM: the same block forward as a bare
tower, and the LLM receives each reduced row on the patch its representative stands for."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vtprune
from vtprune.adapters.hf_clip_vit import HFClipViTAdapter
from vtprune.core.vit import wrap_vit
from vtprune.eval.flops import prefill_flops
from vtprune.testing import IMAGE_TOKEN, Image, make_batch, tiny_model

METHODS = ["tome", "evit", "flowcut"]


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


def _by_hand(model, batch, method, keep):
    """The reference: the tower wrapped on its own, its rows projected and put on their patches' placeholders,
    the other placeholders dropped, every kept token at its original position, the LLM run on the embeddings."""
    tower = model.model.vision_tower
    feature_blocks = model.config.vision_feature_layer % (len(tower.encoder.layers) + 1)
    with wrap_vit(tower, HFClipViTAdapter(tower, feature_blocks), method, keep) as handle:
        hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[feature_blocks]
        patches = handle.last.origin[:, 1:] - 1  # [CLS] is row 0; LLaVA reads the patch rows
    features = model.model.multi_modal_projector(hidden[:, 1:])
    ids = batch["input_ids"][0]
    placeholders = (ids == IMAGE_TOKEN).nonzero().squeeze(1).view(len(features), -1)
    keep_slot = ids != IMAGE_TOKEN
    embeds = model.get_input_embeddings()(ids).clone()
    for image, (rows, slots) in enumerate(zip(patches, placeholders)):
        keep_slot[slots[rows]] = True
        embeds[slots[rows]] = features[image]
    positions = torch.arange(ids.numel())[keep_slot]
    logits = model(inputs_embeds=embeds[keep_slot][None], position_ids=positions[None]).logits
    return logits, patches.sort(-1).values


@pytest.mark.parametrize("method", METHODS)
def test_llm_receives_the_towers_rows_on_their_patches(llava, method):
    batch = make_batch(llava, [[5, Image(), 7, Image(), 4]])
    with torch.no_grad():
        expected, patches = _by_hand(llava, batch, method, keep=16)
        # the reference keeps original positions (FlowCut renumbers by default, as its authors insert fewer tokens)
        options = {"positions": "keep"} if method == "flowcut" else {}
        with vtprune.wrap(llava, method, keep=16, **options) as pruning:
            logits = llava(**batch).logits
            kept = pruning.kept[0][0]  # stage 0, sample 0: visual tokens numbered across its images
            assert pruning.method.name == method and pruning.last.seq_lens[0] == 16 + 2 * 16
    assert kept.tolist() == torch.cat([rows + 64 * image for image, rows in enumerate(patches)]).tolist()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_dense_and_unwrap_restores(llava, method):
    batch = make_batch(llava, [[5, Image(), 7], [3, Image(), 2, Image(), 6]])
    with torch.no_grad():
        dense = llava(**batch).logits
        with vtprune.wrap(llava, method, keep=1.0):
            same = llava(**batch).logits
        torch.testing.assert_close(same, dense, atol=1e-5, rtol=1e-5)
        with vtprune.wrap(llava, method, keep=16):
            assert not torch.allclose(llava(**batch).logits[:, -1], dense[:, -1], atol=1e-4)
        assert torch.equal(llava(**batch).logits, dense)
    assert all("forward" not in layer.__dict__ for layer in llava.model.vision_tower.encoder.layers)


def test_batch_equals_each_sample_alone_and_generate_continues(llava):
    prompts = [[5, Image(), 7], [3, Image(), 2, Image(), 6]]
    batch = make_batch(llava, prompts)
    with torch.no_grad(), vtprune.wrap(llava, "tome", keep=20) as pruning:
        together = llava(**batch).logits[:, -1]
        kept = pruning.kept[0]
        for i, prompt in enumerate(prompts):
            alone = llava(**make_batch(llava, [prompt], seed=i)).logits[:, -1]
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=1e-4)
            assert pruning.kept[0][0].tolist() == kept[i].tolist()
        generated = llava.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated[:, batch["input_ids"].shape[1]].tolist() == together.argmax(-1).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_flops_count_the_smaller_tower(method):
    """Against FlopCounterMode with SDPA's math kernel (whose matmuls it counts); a single prompt, so no padding.
    The merge's matching and EViT's fusing are the work the analytical count leaves out."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = make_batch(model, [[5, Image(), 7, Image(), 2]])
    with torch.no_grad(), vtprune.wrap(model, method, keep=16) as pruning:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(**batch)
        report = prefill_flops(model, pruning.last, pruning.last.encoder_inputs)
        dense = prefill_flops(model, pruning.last, [{"views": 2}])
    assert math.isclose(report.prefill, counter.get_total_flops(), rel_tol=0.005)
    assert report.vision < 0.6 * dense.vision  # 65 -> 33 -> 17 rows: the tower itself got cheaper


def test_unsupported_models_and_options_say_so(llava):
    for family in ("llava_next", "qwen2_5_vl"):
        with pytest.raises(ValueError, match="reduce the CLIP tower of LLaVA-1.5 only"):
            vtprune.wrap(tiny_model(family), "evit", keep=8)
    with pytest.raises(ValueError, match=r"tome: unknown option\(s\) layer"):
        vtprune.wrap(llava, "tome", keep=8, layer=1)
    assert "forward" not in llava.model.vision_tower.encoder.layers[0].__dict__  # nothing left behind
    with pytest.raises(ValueError, match="keep=8 cannot be reached from 64 tokens in 2 blocks"):
        vtprune.wrap(llava, "tome", keep=8)  # the tower has 2 blocks before the layer LLaVA reads; each halves
    with vtprune.wrap(llava, "tome", keep=16):
        with pytest.raises(ValueError, match="already wrapped"):
            vtprune.wrap(llava, "evit", keep=8)
    with vtprune.wrap(llava, "evit", keep=8) as pruning:  # the tower's own wrap went with the last unwrap
        assert pruning.method.name == "evit"


def test_full_strategy_keeps_cls_as_a_structural_token():
    """With vision_feature_select_strategy="full" LLaVA projects [CLS] too: it stays, and keep counts patches."""
    model = tiny_model("llava")
    model.config.vision_feature_select_strategy = "full"
    ids = make_batch(model, [[5, Image(), 7]])
    first = int((ids["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    prompt = torch.cat([ids["input_ids"][0, :first], torch.tensor([IMAGE_TOKEN]), ids["input_ids"][0, first:]])[None]
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "pixel_values": ids["pixel_values"]}
    with torch.no_grad():
        dense = model(**batch).logits
        with vtprune.wrap(model, "tome", keep=1.0):
            torch.testing.assert_close(model(**batch).logits, dense, atol=1e-5, rtol=1e-5)
        with vtprune.wrap(model, "evit", keep=16) as pruning:
            model(**batch)
            kept = pruning.kept[0][0]
    assert kept.numel() == 1 + 16 and int(kept[0]) == 0  # [CLS] (token 0) + 16 patch rows
