"""FlowCut: the layer score, the entropy-adaptive amount and the score's EMA on hand-made inputs, a plain loop
written from the authors' rule on a CLIP tower (alone and inside LLaVA-1.5), keep = all, and the families it serves
or refuses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

import vtprune
import vtprune.methods.flowcut  # registers "flowcut" (not yet imported by vtprune.methods)
from tests.helpers import FAMILIES, make_batch, tiny_model
from vtprune.adapters.hf_clip_vit import HFClipViTAdapter
from vtprune.core.vit import ReduceContext, ViTInfo, wrap_vit
from vtprune.methods.flowcut import STATE_KEY, FlowCut, adaptive_prune_count, flow_scores
from vtprune.testing import IMAGE_TOKEN, Image

timm = pytest.importorskip("timm")
pytest.importorskip("open_clip")


# -- the rule on hand-made inputs ------------------------------------------------------------------------------------
def test_layer_score_is_cls_relation_plus_value_affinity_times_value_norm():
    # rows: [CLS] + 3 patches, 2 heads of width 4 (scale 1/2). Head 0: [CLS]'s query gives the rows logits
    # 0, 1, 0, 2 and its value has dot products 1, 1, 0, 2 with the rows' values; head 1 is all zeros (uniform).
    q = torch.zeros(1, 2, 4, 4)
    k = torch.zeros(1, 2, 4, 4)
    v = torch.zeros(1, 2, 4, 4)
    q[0, 0, 0, 0] = 2.0
    k[0, 0, :, 0] = torch.tensor([0.0, 1.0, 0.0, 2.0])
    v[0, 0] = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, -2, 0, 0], [2, 0, 1, 0]])
    score, relation = flow_scores(q, k, v, prefix=1)

    def softmax(logits):
        e = [math.exp(x) for x in logits]
        return [x / sum(e) for x in e]

    # mean over heads of each head's softmax over all 4 rows, then the patch columns
    rel = [(a + 0.25) / 2 for a in softmax([0.0, 1.0, 0.0, 2.0])[1:]]
    sem = [(a + 0.25) / 2 for a in softmax([1.0, 1.0, 0.0, 2.0])[1:]]  # unscaled v_cls . v_k
    norm = [2 / 2, 2 / 2, 3 / 2]  # L1 norm of the head-averaged value (head 1's values are 0)
    expected = [(r / sum(rel) + s / sum(sem)) * n for r, s, n in zip(rel, sem, norm)]
    assert_close(relation[0], torch.tensor(rel))
    assert_close(score[0], torch.tensor(expected))


def test_adaptive_amount_follows_the_entropy_of_cls_attention():
    uniform = torch.full((1, 8), 1 / 8)
    assert adaptive_prune_count(uniform, remaining=1, keep=2) == 0  # rho = 1: nothing to cut yet
    one_hot = torch.zeros(1, 8)
    one_hot[0, 3] = 1.0
    assert adaptive_prune_count(one_hot, remaining=4, keep=2) == 3  # rho = 0: (8 - 2) / sqrt(4)
    # two equal peaks of 4: rho = log 2 / log 4 = 1/2, (4 - 1) / 1 * (1 - 1/4) = 2.25 -> 2; unnormalised input
    # and zero probabilities are fine (the authors' p * log p would give NaN)
    assert adaptive_prune_count(torch.tensor([[2.0, 2.0, 0.0, 0.0]]), remaining=1, keep=1) == 2
    assert adaptive_prune_count(torch.cat([uniform, one_hot]), remaining=4, keep=2) == 3  # the batch's largest


def _context(values: torch.Tensor, block: int, depth: int, target: int, state: dict, queries=None, keys=None):
    """One reduction with [CLS] + 4 patch rows, one head of width 4; zero queries and a zero [CLS] value make both
    attention terms uniform, so each patch row's layer score is its value's L1 norm / 2."""
    rows = values.shape[0]
    x = torch.arange(rows * 3, dtype=torch.float32).view(1, rows, 3)
    zeros = torch.zeros(1, 1, rows, 4)
    info = ViTInfo("test", depth, rows - 1, 1, 1)
    return ReduceContext(
        block, x, zeros if keys is None else keys, zeros if queries is None else queries, torch.ones(1, rows),
        torch.arange(rows)[None] + 10, 1, target, values=values[None, None], info=info, state=state,
    )  # fmt: skip


def _values(norms):
    values = torch.zeros(len(norms) + 1, 4)
    values[1:, 0] = torch.tensor(norms, dtype=torch.float32)
    return values


def test_scores_accumulate_by_ema_and_the_last_cut_keeps_the_top_accumulated_rows():
    # depth 3: block 0 has 1 block left before the read block (odd: it only scores), block 1 none (cut to target)
    first, second = _values([10.0, 0.0, 6.0, 7.0]), _values([0.0, 10.0, 6.0, 7.0])
    state: dict = {}
    ctx = _context(first, block=0, depth=3, target=2, state=state)
    x, sizes, origin = FlowCut().reduce(ctx)
    assert torch.equal(x, ctx.x) and origin.tolist() == [[10, 11, 12, 13, 14]]
    assert_close(state[STATE_KEY][0], torch.tensor([5.0, 0.0, 3.0, 3.5]))
    x, sizes, origin = FlowCut().reduce(_context(second, block=1, depth=3, target=2, state=state))
    # EMA 0.5: (2.5, 2.5, 3, 3.5) -> patches 2, 3 (either block alone would keep patch 3 with patch 0 or 1)
    assert origin.tolist() == [[10, 13, 14]] and sizes.tolist() == [[1.0, 1.0, 1.0]]
    assert_close(x[0], ctx.x[0, [0, 3, 4]])
    assert_close(state[STATE_KEY][0], torch.tensor([3.0, 3.5]))  # the kept rows' accumulated scores
    # ema = 0: the last block's scores alone
    state = {}
    FlowCut(ema=0.0).reduce(_context(first, block=0, depth=3, target=2, state=state))
    _, _, origin = FlowCut(ema=0.0).reduce(_context(second, block=1, depth=3, target=2, state=state))
    assert origin.tolist() == [[10, 12, 14]]


def test_a_pruning_block_before_the_last_cuts_the_adaptive_amount():
    # depth 4, block 0: 2 blocks left (even) -> adaptive; [CLS] attends to patch 1 only (rho ~ 0):
    # round((4 - 1) / sqrt(2)) = 2 rows go, 2 of the 4 stay (not just the target's 1)
    queries, keys = torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4)
    queries[0, 0, 0, 0] = 100.0
    keys[0, 0, 1, 0] = 1.0
    values = _values([1.0, 4.0, 3.0, 2.0])
    state: dict = {}
    _, _, origin = FlowCut().reduce(_context(values, 0, depth=4, target=1, state=state, queries=queries, keys=keys))
    assert origin.tolist() == [[10, 11, 12]]  # [CLS], then the two best scores: patch 0 (all the attention), 1
    # every=3: 2 blocks left is not a multiple of 3, so this block only scores
    _, _, origin = FlowCut(every=3).reduce(_context(values, 0, depth=4, target=1, state={}, queries=queries, keys=keys))
    assert origin.shape[1] == 5


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"flowcut: ema must be a number in \[0, 1\)"):
        FlowCut(ema=1.5)
    for every in (0, 1.5, True):
        with pytest.raises(ValueError, match="flowcut: every must be an int >= 1"):
            FlowCut(every=every)
    with pytest.raises(ValueError, match=r"flowcut: positions must be one of \('keep', 'renumber'\)"):
        FlowCut(positions="first")
    with pytest.raises(ValueError, match=r"flowcut: unknown option\(s\) layer"):
        vtprune.wrap(tiny_model("llava"), "flowcut", keep=8, layer=2)
    no_cls = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                               depth=3, num_heads=3, class_token=False, global_pool="", num_classes=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"this tower has no \[CLS\] token"):
        vtprune.wrap(no_cls, "flowcut", keep=4)
    one_block = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, image_size=32, patch_size=8))  # fmt: skip
    with pytest.raises(ValueError, match="only 1 block"):
        vtprune.wrap(one_block, "flowcut", keep=4)


# -- a plain loop from the authors' rule ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_llava():
    """Tiny LLaVA-1.5 with an 8-layer CLIP tower (reads block 6) and [CLS] attention sharpened (queries x 40), so
    the adaptive amounts are not zero."""
    config = copy.deepcopy(tiny_model("llava").config)
    config.vision_config.num_hidden_layers = 8
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
    return model


def _reference_tower(tower, pixel_values, keep, read):
    """The authors' loop on a CLIP tower (eager attention, pruning after each block's MLP): rows entering each block,
    the hidden states of block ``read - 1``'s output and each row's original row (row 0 = [CLS])."""
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    views = h.shape[0]
    origin = torch.arange(h.shape[1]).expand(views, -1)
    target, select_layer, cumulative, rows = keep + 1, read - 1, None, []
    for idx, layer in enumerate(tower.encoder.layers[:read]):
        rows.append(h.shape[1])
        attn, x = layer.self_attn, layer.layer_norm1(h)
        q, k, v = (p(x).view(views, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
        probs = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)
        h = h + attn.out_proj((probs @ v).transpose(1, 2).flatten(2))
        h = h + layer.mlp(layer.layer_norm2(h))
        if h.shape[1] <= target:
            continue
        cls_attention = probs[:, :, 0, 1:].mean(1)
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-2, -1), dim=-1)[:, :, 0].mean(1)[:, 1:]
        norm = v.mean(1)[:, 1:].abs().sum(-1)
        relation = cls_attention / cls_attention.sum(-1, keepdim=True)
        scores = (relation + semantic / semantic.sum(-1, keepdim=True)) * norm
        cumulative = scores if cumulative is None else 0.5 * cumulative + 0.5 * scores
        rpl = select_layer - idx - 1
        if rpl % 2:
            continue
        if rpl:
            n = cls_attention.shape[-1]
            p = cls_attention / cls_attention.sum(-1, keepdim=True)
            rho = -(p * p.log()).sum(-1) / math.log(n)
            prune = int(((n - keep) / math.sqrt(rpl) * (1 - rho**2)).max().round())
        else:
            prune = h.shape[1]
        top = cumulative.topk(max(h.shape[1] - prune, target) - 1, dim=1).indices.sort(1).values
        h = torch.cat([h[:, :1], h[:, 1:].gather(1, top[..., None].expand(-1, -1, h.shape[-1]))], 1)
        cumulative = cumulative.gather(1, top)
        origin = torch.cat([origin[:, :1], origin[:, 1:].gather(1, top)], 1)
    return rows, h, origin


def test_tower_selects_what_the_authors_loop_selects(deep_llava):
    tower = deep_llava.model.vision_tower
    pixels = make_batch(deep_llava, [[5, Image(), 7, Image(), 4]])["pixel_values"]
    with torch.no_grad():
        rows, expected, expected_origin = _reference_tower(tower, pixels, keep=12, read=7)
        with wrap_vit(tower, HFClipViTAdapter(tower, feature_blocks=7), "flowcut", keep=12) as handle:
            hidden = tower(pixels, output_hidden_states=True).hidden_states[7]
    assert rows == handle.last.seq_lens[:7] == [65, 65, 53, 53, 39, 39, 13]  # adaptive cuts at blocks 1 and 3
    assert torch.equal(handle.last.origin, expected_origin)
    assert_close(hidden, expected, atol=1e-5, rtol=1e-4)
    # images encoded in one call cut the larger of their amounts at each step (the authors' batched rule), so alone
    # each takes its own path to the same final count
    alone = []
    with torch.no_grad(), wrap_vit(tower, HFClipViTAdapter(tower, feature_blocks=7), "flowcut", keep=12) as handle:
        for image in pixels:
            tower(image[None])
            alone.append(handle.last.seq_lens[:7])
    assert alone == [[65, 65, 58, 58, 42, 42, 13], [65, 65, 53, 53, 43, 43, 13]]


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_llava_receives_the_reference_rows_on_their_patches(deep_llava, positions):
    batch = make_batch(deep_llava, [[5, Image(), 7, Image(), 4]])
    ids = batch["input_ids"][0]
    with torch.no_grad():
        _, hidden, origin = _reference_tower(deep_llava.model.vision_tower, batch["pixel_values"], keep=12, read=7)
        features = deep_llava.model.multi_modal_projector(hidden[:, 1:])
        patches = origin[:, 1:] - 1
        placeholders = (ids == IMAGE_TOKEN).nonzero().squeeze(1).view(2, -1)
        keep_slot = ids != IMAGE_TOKEN
        embeds = deep_llava.get_input_embeddings()(ids).clone()
        for image, (rows, slots) in enumerate(zip(patches, placeholders)):
            keep_slot[slots[rows]] = True
            embeds[slots[rows]] = features[image]
        kept_positions = torch.arange(ids.numel())[keep_slot]
        position_ids = torch.arange(kept_positions.numel()) if positions == "renumber" else kept_positions
        expected = deep_llava(inputs_embeds=embeds[keep_slot][None], position_ids=position_ids[None]).logits
        with vtprune.wrap(deep_llava, "flowcut", keep=12, positions=positions) as pruning:
            logits = deep_llava(**batch).logits
            kept = pruning.kept[0][0]
            assert pruning.config()["positions"] == positions
    assert kept.tolist() == torch.cat([rows + 64 * image for image, rows in enumerate(patches)]).tolist()
    assert_close(logits, expected, atol=1e-5, rtol=1e-4)


# -- keep = all, and where it applies ---------------------------------------------------------------------------------
def test_keep_all_is_the_dense_model(deep_llava):
    batch = make_batch(deep_llava, [[5, Image(), 7], [3, Image(), 2, Image(), 6]])
    with torch.no_grad():
        dense = deep_llava(**batch).logits
        with vtprune.wrap(deep_llava, "flowcut", keep=1.0):
            assert_close(deep_llava(**batch).logits, dense, atol=1e-5, rtol=1e-5)
        with vtprune.wrap(deep_llava, "flowcut", keep=16):
            assert not torch.allclose(deep_llava(**batch).logits[:, -1], dense[:, -1], atol=1e-4)
        assert torch.equal(deep_llava(**batch).logits, dense)  # unwrap restores the tower


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_forward_and_generate_where_it_applies_and_a_clear_error_elsewhere(family):
    model = tiny_model(family)
    if family != "llava":
        with pytest.raises(ValueError, match="reduce the CLIP tower of LLaVA-1.5 only"):
            vtprune.wrap(model, "flowcut", keep=8)
        return
    batch = make_batch(model, [[5, Image(), 7], [3, Image(), 2, Image(), 6]])
    with torch.no_grad(), vtprune.wrap(model, "flowcut", keep=8) as pruning:
        last = model(**batch).logits[:, -1]
        assert [k.numel() for k in pruning.kept[0]] == [8, 16]  # keep tokens per image
        assert pruning.last.encoder_inputs[0]["block_rows"][:2] == [65, 9]  # the tower itself runs on fewer rows
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated[:, batch["input_ids"].shape[1]].tolist() == last.argmax(-1).tolist()


def test_bare_vision_transformers_end_at_keep_rows():
    """timm (with registers, kept like [CLS]), open_clip and transformers' CLIP: the last block runs on the prefix +
    keep rows."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=48,
                            depth=4, num_heads=3, reg_tokens=2, num_classes=5).eval()  # fmt: skip
    open_clip_vit = VisionTransformer(image_size=32, patch_size=4, width=48, layers=4, heads=3, mlp_ratio=2.0,
                                      output_dim=16).eval()  # fmt: skip
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, image_size=32, patch_size=4)).eval()  # fmt: skip
    with torch.no_grad():
        for model, prefix in ((vit, 3), (open_clip_vit, 1), (clip, 1)):
            dense = model(images)
            with vtprune.wrap(model, "flowcut", keep=10) as handle:
                pruned = model(images)
            assert handle.last.seq_lens[-1] == prefix + 10 and handle.last.seq_lens[0] == prefix + 64
            assert bool((handle.last.origin[:, :prefix] == torch.arange(prefix)).all())  # prefix rows stay
            if not isinstance(dense, torch.Tensor):  # transformers' CLIP: its pooled [CLS]
                dense, pruned = dense.pooler_output, pruned.pooler_output
            assert pruned.shape == dense.shape and not torch.allclose(pruned, dense)
