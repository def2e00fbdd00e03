"""DToP early exit (vtprune.methods.dtop), its segmentation metrics, and the embedded digit-scene segmenter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtprune.eval import segmentation
from vtprune.eval.segmentation import (
    confusion,
    evaluate_thresholds,
    iou_per_class,
    mean_iou,
)
from vtprune.methods.dtop import DToPSegmenter, class_scores, early_exit

timm = pytest.importorskip("timm")

CLASSES = 4
SHIPPED_MIN_MIOU = 0.4  # the shipped segmenter: 0.437 on these 60 scenes, 0.453 on training.json's 300


def _segmenter(stages=None, class_token=False, seed=0, keep_per_class=5, **kwargs) -> DToPSegmenter:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    pool = "token" if class_token else ""
    backbone = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                                 global_pool=pool, class_token=class_token, **kwargs)  # fmt: skip
    stages = stages if stages is not None else [1, 3]
    return DToPSegmenter(backbone, CLASSES, stages, head_heads=2, keep_per_class=keep_per_class).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(5, 3, 16, 16)


def _midpoint_thresh(model: DToPSegmenter, images: torch.Tensor) -> float:
    """A threshold between the first stage's confidences, so images lose different numbers of tokens."""
    class_logits, mask_logits = model.stage_outputs(images)[0]
    confidence = class_scores(class_logits, mask_logits).max(1).values
    return float(confidence.flatten().median())


# --- the exit rule on hand-made confidence maps -------------------------------------------------------------------


def test_easy_tokens_exit_but_each_class_keeps_its_most_confident():
    # token t's score: class 0 for t < 8 (confidence 0.91 .. 0.98), class 1 for t in 8, 9 (0.99), t = 10 below thresh
    scores = torch.zeros(1, 3, 11)
    scores[0, 0, :8] = torch.tensor([0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98])
    scores[0, 1, 8:10] = 0.99
    scores[0, 2, 10] = 0.5
    leaving = early_exit(scores, torch.ones(1, 11, dtype=torch.bool), thresh=0.9, keep_per_class=5)
    # class 0: 8 easy tokens, the 5 most confident (t = 3..7) stay; class 1: only 2 easy, both stay; t = 10 not easy
    assert leaving[0].tolist() == [True, True, True] + [False] * 8
    everyone = early_exit(scores, torch.ones(1, 11, dtype=torch.bool), thresh=0.9, keep_per_class=0)
    assert everyone[0].tolist() == [True] * 10 + [False]


def test_threshold_is_strict_and_only_candidates_exit():
    scores = torch.tensor([[[0.9, 0.95, 0.95, 1.0], [0.1, 0.05, 0.05, 0.0]]])
    candidates = torch.tensor([[True, True, False, True]])
    leaving = early_exit(scores, candidates, thresh=0.9, keep_per_class=1)
    # 0.9 is not above 0.9; t = 2 is not a candidate; of the easy t = 1, 3 the most confident (t = 3) stays
    assert leaving[0].tolist() == [False, True, False, False]
    assert not early_exit(scores, torch.ones(1, 4, dtype=torch.bool), thresh=1.0, keep_per_class=0).any()


def test_keep_per_class_is_applied_per_image():
    scores = torch.zeros(2, 2, 6)
    scores[0, 0] = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94])
    scores[1, 1] = torch.tensor([0.94, 0.95, 0.96, 0.97, 0.98, 0.99])
    leaving = early_exit(scores, torch.ones(2, 6, dtype=torch.bool), thresh=0.5, keep_per_class=2)
    assert leaving.tolist() == [[False, False, True, True, True, True], [True, True, True, True, False, False]]


# --- the segmenter ------------------------------------------------------------------------------------------------


def test_threshold_one_is_the_dense_segmenter(images):
    model = _segmenter()
    captured = []
    hook = model.backbone.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        out = model(images, thresh=1.0)
        timm_features = model.backbone.forward_features(images)  # timm's own forward, its final norm aside
        class_logits, mask_logits = model.stage_outputs(images)[-1]
    hook.remove()
    assert torch.equal(captured[0], captured[1])
    assert torch.allclose(model.backbone.norm(captured[0]), timm_features)
    assert torch.allclose(out.mask_logits.flatten(2), mask_logits, atol=1e-6)
    assert torch.allclose(out.scores.flatten(2), class_scores(class_logits, mask_logits), atol=1e-6)
    assert (out.exit_block == 3).all() and (out.rows == 16).all()


def test_exited_tokens_keep_the_exit_heads_prediction_and_leave_later_blocks(images):
    model = _segmenter()
    with torch.no_grad():
        first_class, first_masks = model.stage_outputs(images)[0]
        out = model(images, thresh=0.0)  # every token is easy after stage 1; 1 per predicted class stays
    exited = out.exit_block == 1
    assert exited.any() and (~exited).any()
    masks = out.mask_logits.flatten(2)
    assert torch.allclose(masks.transpose(1, 2)[exited], first_masks.transpose(1, 2)[exited], atol=1e-6)
    # later blocks run on the survivors only
    survivors = (~exited).sum(1)
    assert out.rows[:, :2].eq(16).all() and out.rows[:, 2:].eq(survivors[:, None]).all()
    # the survivors' result is what the later blocks give on the survivors alone (exited rows are no keys)
    for b in range(len(images)):
        with torch.no_grad():
            x = model.embed(images[b : b + 1])
            for block in model.backbone.blocks[:2]:
                x = block(x)
            alive = (~exited[b]).nonzero().flatten()
            x = x[:, alive]
            for block in model.backbone.blocks[2:]:
                x = block(x)
            _, last_masks = model.heads[1](x)
        assert torch.allclose(masks[b][:, alive], last_masks[0], atol=1e-5)


def test_a_batch_equals_each_image_alone(images):
    for class_token in (False, True):
        model = _segmenter(class_token=class_token)
        with torch.no_grad():
            thresh = _midpoint_thresh(model, images)
            out = model(images, thresh=thresh)
            assert len(set(out.rows[:, -1].tolist())) > 1, "the images should keep different numbers of tokens"
            for b in range(len(images)):
                alone = model(images[b : b + 1], thresh=thresh)
                assert torch.allclose(out.scores[b], alone.scores[0], atol=1e-5)
                assert torch.equal(out.exit_block[b], alone.exit_block[0])
                assert torch.equal(out.rows[b], alone.rows[0])
        if class_token:
            assert (out.rows >= 1 + model.keep_per_class).all()  # [CLS] never exits


def test_timm_fused_and_unfused_attention_agree(images):
    model = _segmenter(stages=[0, 1, 3])
    with torch.no_grad():
        thresh = _midpoint_thresh(model, images)
        fused = model(images, thresh=thresh)
        for block in model.backbone.blocks:
            block.attn.fused_attn = False
        plain = model(images, thresh=thresh)
    assert torch.equal(fused.exit_block, plain.exit_block)
    assert torch.allclose(fused.scores, plain.scores, atol=1e-5)


def test_bad_inputs_name_the_parameter(images):
    with pytest.raises(ValueError, match=r"stages must be .* \[0, 3\] ending with 3"):
        _segmenter(stages=[1, 2])
    with pytest.raises(ValueError, match="stages"):
        _segmenter(stages=[2, 1, 3])
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        DToPSegmenter(torch.nn.Linear(2, 2), CLASSES)
    with pytest.raises(ValueError, match=r"thresh must lie in \[0, 1\]"):
        _segmenter()(images, thresh=1.5)
    with pytest.raises(ValueError, match="keep_per_class must be >= 1"):
        _segmenter(keep_per_class=0)
    with pytest.raises(ValueError, match="keep_per_class"):
        early_exit(torch.rand(1, 2, 3), torch.ones(1, 3, dtype=torch.bool), 0.5, keep_per_class=-1)


# --- metrics ------------------------------------------------------------------------------------------------------


def test_mean_iou_on_a_known_map():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 2]])
    pred = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 3]])
    matrix = confusion(pred, target, 4)
    # class 0: 4 hits, union 5; class 1: 2 / 3; class 2: 0 / 1; class 3: 0 / 1
    assert torch.allclose(iou_per_class(matrix), torch.tensor([0.8, 2 / 3, 0.0, 0.0], dtype=torch.float64))
    assert mean_iou(confusion(target, target, 5)) == 1.0  # class 4 absent from both: not averaged


def test_evaluation_rows_are_written_as_they_go_and_resumed(tmp_path, images, monkeypatch):
    model = _segmenter()
    labels = torch.randint(0, CLASSES, (len(images), 16, 16))
    out = tmp_path / "dtop.jsonl"
    rows = evaluate_thresholds(model, images, labels, [1.0, 0.0], batch=2, out=out)
    assert [json.loads(line)["thresh"] for line in out.read_text().splitlines()] == [1.0, 0.0]
    assert rows[0]["token_blocks"] == 1.0 and rows[1]["token_blocks"] < 1.0
    assert rows[1]["gflops"] < rows[0]["gflops"]
    monkeypatch.setattr(segmentation, "flops_per_image", lambda *a: pytest.fail("recomputed a finished threshold"))
    assert evaluate_thresholds(model, images, labels, [1.0, 0.0], out=out) == rows
    other = _segmenter(seed=1)  # other weights: nothing is reused
    monkeypatch.setattr(segmentation, "flops_per_image", lambda *a: [1, 1])
    assert evaluate_thresholds(other, images, labels, [1.0], out=out)[0]["gflops"] == 1e-9


# --- digit scenes and the shipped segmenter -------------------------------------------------------------------------


def test_scenes_are_reproducible_and_splits_do_not_share_digits_or_backgrounds():
    from vtprune.data.digit_grids import source_pool
    from vtprune.data.digit_scenes import CLASSES, scene, scenes

    image, labels = scene("test", 3, seed=1000)
    again, labels_again = scene("test", 3, seed=1000)
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and labels.max() < len(CLASSES)
    _, many = scenes("train", 0, 20)
    assert 0.05 < (many > 0).mean() < 0.5 and len(np.unique(many)) > 5
    assert not set(source_pool("train")) & set(source_pool("test"))
    with pytest.raises(ValueError, match="split must be one of"):
        scene("validation", 0)


@pytest.fixture(scope="module")
def shipped():
    from vtprune.data.digit_scenes import scenes
    from vtprune.embedded.segmenter import load_segmenter, to_tensor

    images, labels = scenes("test", 0, 60, seed=1000)
    return load_segmenter(), to_tensor(images), torch.from_numpy(labels)


def test_shipped_segmenter_segments_held_out_scenes_and_exits_save_flops_at_the_same_miou(shipped):
    model, images, labels = shipped
    dense, pruned = evaluate_thresholds(model, images, labels, [1.0, 0.98], flop_images=10)
    assert dense["miou"] > SHIPPED_MIN_MIOU and dense["token_blocks"] == 1.0
    assert pruned["gflops"] < 0.8 * dense["gflops"]  # the paper's shape: 20-35 % less compute (here 25 %) ...
    assert pruned["miou"] > dense["miou"] - 0.01  # ... at about the same mIoU


def test_training_smoke_run_saves_a_loadable_segmenter(tmp_path):
    from vtprune.embedded.segmenter import load_segmenter
    from vtprune.embedded.train_dtop import EVAL_THRESHOLDS, train

    record = train(2, tmp_path, batch_size=4, threads=None, eval_images=4, log_every=0, embed_dim=32, num_heads=2)
    assert [row["thresh"] for row in record["held_out"]["rows"]] == list(EVAL_THRESHOLDS)
    model = load_segmenter(tmp_path)
    assert model.stages == [1, 3, 5] and json.loads((tmp_path / "training.json").read_text())["steps"] == 2
    assert model.backbone.embed_dim == 32  # the backbone override is saved and loaded back
    with pytest.raises(ValueError, match="backbone: unknown \\['width'\\]"):
        train(1, None, width=64)


def test_cli_prints_the_threshold_table_and_writes_rows(tmp_path):
    from typer.testing import CliRunner

    from vtprune.cli import app

    out = tmp_path / "dtop.jsonl"
    result = CliRunner().invoke(app, ["dtop", "--thresholds", "1.0,0.9", "--images", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and len(out.read_text().splitlines()) == 2
    assert (tmp_path / "exits.png").stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["dtop", "--thresholds", "1.0,2", "--out", str(out)])
    assert bad.exit_code != 0 and "thresholds must be numbers in [0, 1]" in bad.output


def test_wrapping_with_dtop_points_to_the_segmenter():
    import vtprune

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=32, num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"DToPSegmenter, not a wrap\); methods for vision transformers: evit, flowcut, tome"):
        vtprune.wrap(vit, "dtop", keep=4)
    with pytest.raises(ValueError, match="DToPSegmenter, not a wrap"):
        vtprune.method_class("dtop")
