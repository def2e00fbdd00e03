"""What users see: one colour and marker per method in every plot, readable FLOPs and budget axes, ``show``'s kept
patches on dark and light images, and ``dtop``'s legends. Pictures are checked by their pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from PIL import Image as PILImage

from vtprune.eval import style
from vtprune.eval.report import Report
from vtprune.eval.show import DROPPED_MIX, DROPPED_TINT, KEPT_OUTLINE, draw_kept, outline_segments, show
from vtprune.eval.style import (
    COLOURS,
    KNOWN_METHODS,
    budget_ticks,
    flops_unit,
    method_style,
    method_styles,
    preferred_slot,
)
from vtprune.eval.sweep_report import write_reports

# -- the palette -------------------------------------------------------------------------------------------------------


def _lab(hex_colour: str) -> np.ndarray:
    rgb = np.array(to_rgb(hex_colour))
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _ciede2000(one: np.ndarray, two: np.ndarray) -> float:
    """The CIEDE2000 colour difference (Sharma, Wu and Dalal's formulation)."""
    (l1, a1, b1), (l2, a2, b2) = one, two
    mean_c = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(mean_c**7 / (mean_c**7 + 25**7)))
    a1, a2 = a1 * (1 + g), a2 * (1 + g)
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360
    dh = 0.0 if c1 * c2 == 0 else (h2 - h1 + 180) % 360 - 180
    d_l, d_c, d_h = l2 - l1, c2 - c1, 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh) / 2)
    mean_l, mean_c = (l1 + l2) / 2, (c1 + c2) / 2
    mean_h = h1 + h2 if c1 * c2 == 0 else (h1 + h2) / 2 + (180 if abs(h1 - h2) > 180 else 0)
    t = (1 - 0.17 * np.cos(np.radians(mean_h - 30)) + 0.24 * np.cos(np.radians(2 * mean_h))
         + 0.32 * np.cos(np.radians(3 * mean_h + 6)) - 0.20 * np.cos(np.radians(4 * mean_h - 63)))  # fmt: skip
    s_l = 1 + 0.015 * (mean_l - 50) ** 2 / np.sqrt(20 + (mean_l - 50) ** 2)
    s_c, s_h = 1 + 0.045 * mean_c, 1 + 0.015 * mean_c * t
    rotation = 60 * np.exp(-(((mean_h % 360) - 275) / 25) ** 2)
    r_t = -2 * np.sqrt(mean_c**7 / (mean_c**7 + 25**7)) * np.sin(np.radians(rotation))
    return float(np.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h)))


PINNED = 36  # "my_method"'s slot (its first choice, 22, went to flowcut when the seed methods were listed; 30 to dycoke)


def _unknown_names(count: int) -> list[str]:
    return [f"my_method_{i}" for i in range(count)]


def test_palette_gives_40_distinct_colours_and_colour_marker_pairs():
    assert len(COLOURS) == 40 and len(set(COLOURS)) == 40
    labs = [_lab(c) for c in COLOURS]
    distance = np.array([[_ciede2000(a, b) if a is not b else np.inf for b in labs] for a in labs])
    assert distance.min() > 12.5 and distance[:20, :20].min() > 17.5  # as style.py says: no two slots read alike
    assert _ciede2000(_lab("#ff0000"), _lab("#ff1000")) < 3  # (the measure: near-equal reds are near)
    for reserved in ("#000000", "#ffffff", "#808080"):  # dense, the background, the grid keep their own colours
        assert min(_ciede2000(lab, _lab(reserved)) for lab in labs) > 12.5
    names = [*KNOWN_METHODS, *_unknown_names(40 - len(KNOWN_METHODS))]
    styles = method_styles(names)
    assert len({s.colour for s in styles.values()}) == 40
    assert len({(s.colour, s.marker) for s in styles.values()}) == 40
    assert all(s.marker != "*" and s.linestyle == "-" for s in styles.values())  # the star is dense's
    crowded = method_styles([*names, "one_more"])  # past 40, colours repeat but the line is dashed
    assert crowded["one_more"].linestyle == "--" and len(KNOWN_METHODS) == len(set(KNOWN_METHODS))


def test_a_method_keeps_its_style_whatever_else_is_drawn():
    first = method_styles(["fastv", "divprune", "visionzip", "my_method"])
    second = method_styles(["my_method", "visionzip", "pdrop", "random", "tome", "entropyprune", "vtc_cls"])
    assert first["visionzip"] == second["visionzip"] == method_style("visionzip")
    assert first["my_method"] == second["my_method"] == method_style("my_method")
    assert first["divprune"].colour != second["entropyprune"].colour != first["visionzip"].colour
    # the slot comes from the name alone: registered names in their fixed order, others from a stable hash
    assert method_style("fastv").colour == COLOURS[KNOWN_METHODS.index("fastv")]
    assert preferred_slot("my_method") == PINNED and len(KNOWN_METHODS) <= PINNED < 40


def test_listing_a_new_method_moves_only_the_names_on_its_slot(monkeypatch):
    names = _unknown_names(300)
    before = {name: preferred_slot(name) for name in names}
    listed = {name: method_style(name) for name in KNOWN_METHODS}
    monkeypatch.setattr(style, "KNOWN_METHODS", (*KNOWN_METHODS, "newly_listed"))
    new_slot = len(KNOWN_METHODS)
    assert preferred_slot("newly_listed") == new_slot
    moved = [name for name in names if preferred_slot(name) != before[name]]
    assert moved and all(before[name] == new_slot for name in moved)  # only those that had its slot
    assert all(preferred_slot(name) != new_slot for name in names)
    assert {name: method_style(name) for name in KNOWN_METHODS} == listed
    assert method_style("dense").colour == "#000000" and method_style("dense").marker == "*"


def test_hashed_names_that_collide_are_told_apart_in_any_order():
    slots: dict[int, str] = {}
    for name in _unknown_names(200):
        other = slots.setdefault(preferred_slot(name), name)
        if other != name:
            break
    pair = [other, name]
    together, reversed_ = method_styles(pair), method_styles(pair[::-1])
    assert together == reversed_ and together[other].colour != together[name].colour
    assert together[min(pair)] == method_style(min(pair))  # the first name by sort order keeps its own slot


def test_flops_units_and_budget_ticks_read_plainly():
    assert flops_unit([2.2e-4, 3.9e-4]) == ("GFLOPs", 1e3)  # the demo: 0.22 .. 0.39 GFLOPs, not x1e-4 TFLOPs
    assert flops_unit([0.5, 3.2]) == ("TFLOPs", 1.0)
    assert flops_unit([0.04, 0.9]) == ("GFLOPs", 1e3)
    assert flops_unit([4e-7, None]) == ("MFLOPs", 1e6)
    assert flops_unit([1200.0]) == ("PFLOPs", 1e-3)
    assert budget_ticks([4, 8, 16, 32]) == [4, 8, 16, 32]
    assert budget_ticks([16, 24.5]) == [16, 24, 32]
    assert budget_ticks([5, 60]) == [4, 8, 16, 32, 64]
    assert budget_ticks([None, 0]) == []


# -- the sweep's and the report's plots --------------------------------------------------------------------------------


def _write_sweep(folder, methods, keeps=(32, 16, 8, 4), limit=10, append=False):
    """A results.jsonl as the sweep writes it: dense, then every (method, keep), with TFLOPs of a tiny model."""
    folder.mkdir(parents=True, exist_ok=True)
    setup = {"model": "embedded", "tasks": ["digits"], "limit": limit}
    rows = [{"setup": setup, "method": "dense", "keep": None, "metrics": {"digits": {"accuracy": 0.9}},
             "cost": {"tflops_prefill": 3.9e-4, "visual_tokens": 64.0, "prefill_ms": 9.0, "documents": 10}}]  # fmt: skip
    for rank, method in enumerate(methods):
        for keep in keeps:
            rows.append({"setup": setup, "method": method, "keep": keep,
                         "metrics": {"digits": {"accuracy": 0.3 + 0.1 * rank + keep / 100}},
                         "cost": {"tflops_prefill": 2e-4 + keep * 5e-6, "visual_tokens": float(keep),
                                  "prefill_ms": 8.0, "documents": 10}})  # fmt: skip
    with (folder / "results.jsonl").open("a" if append else "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _pixels(path) -> np.ndarray:
    with PILImage.open(path) as png:
        return np.asarray(png.convert("RGB")).astype(int)


def _count(pixels: np.ndarray, colour, tolerance: int = 6) -> int:
    rgb = np.array(to_rgb(colour)) * 255 if isinstance(colour, str) else np.array(colour)
    return int((np.abs(pixels - rgb).max(-1) <= tolerance).sum())


@pytest.fixture
def figures(monkeypatch):
    """Every Figure saved during the test, drawn (tick labels set) before it is written."""
    saved = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _tick_texts(axis) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels() if label.get_text()]


def test_pareto_plot_draws_each_method_in_its_own_colour_with_plain_axes(tmp_path, figures):
    methods = ["fastv", "divprune", "visionzip"]
    _, _, png = write_reports(_write_sweep(tmp_path / "a", methods))
    pixels = _pixels(png)
    colours = [method_style(m).colour for m in methods]
    assert len(set(colours)) == 3
    for method, colour in zip(methods, colours):
        assert _count(pixels, colour) > 150, method  # its markers and lines, in its own colour
    left, right = figures[-1].axes[:2]
    assert left.get_xlabel() == "prefill GFLOPs per sample"
    assert left.xaxis.get_offset_text().get_text() == "" and all("e" not in t for t in _tick_texts(left.xaxis))
    assert float(_tick_texts(left.xaxis)[0].replace("−", "-")) >= 0.1  # GFLOPs: 0.20, 0.25, ... not 2.0 x1e-4
    assert _tick_texts(right.xaxis) == ["4", "8", "16", "32"]  # not 2^2 .. 2^5
    legend = figures[-1].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["divprune", "fastv", "visionzip", "dense"]


def test_a_method_has_the_same_colour_in_two_sweeps_with_different_methods(tmp_path):
    _, _, first = write_reports(_write_sweep(tmp_path / "a", ["fastv", "divprune", "visionzip"]))
    _, _, second = write_reports(_write_sweep(tmp_path / "b", ["visionzip", "pdrop", "random", "entropyprune"]))
    shared = method_style("visionzip").colour
    assert _count(_pixels(first), shared) > 150 and _count(_pixels(second), shared) > 150
    assert _count(_pixels(second), method_style("divprune").colour) == 0  # absent methods leave their colour free
    assert _count(_pixels(second), method_style("entropyprune").colour) > 150


def test_plot_draws_every_setup_of_a_folder_and_names_it(tmp_path, figures):
    folder = _write_sweep(tmp_path / "a", ["fastv", "random"], limit=10)
    _write_sweep(folder, ["fastv"], keeps=(16, 8), limit=50, append=True)  # a rerun with another limit
    records, csv_path, png = write_reports(folder)
    assert {r["setup"] for r in records} == {"limit=10", "limit=50"}  # named by what differs
    assert len(figures[-1].axes) == 4 and figures[-1].axes[0].get_title(loc="left") == "limit=10"
    assert "setup" in csv_path.read_text().splitlines()[0]
    dense = [r for r in records if r["method"] == "dense"]
    assert len(dense) == 2 and all(r["vs_dense"] == 1.0 for r in dense)  # each setup against its own dense
    only, _, _ = write_reports(folder, setup=2)
    assert {r["setup"] for r in only} == {"model=embedded"} and {r["method"] for r in only} == {"dense", "fastv"}
    with pytest.raises(ValueError, match=r"setup must be one of 1..2 \(1: limit=10; 2: limit=50\), got 3"):
        write_reports(folder, setup=3)


def test_report_plot_uses_the_method_styles_and_a_flops_unit(tmp_path, figures):
    rows = [{"method": "dense", "keep": None, "visual_tokens": 64.0, "tflops_prefill": 5.5e-5, "prefill_ms": 9.0}]
    for method in ("fastv", "random"):
        for keep in (32, 16, 4):
            rows.append({"method": method, "keep": keep, "visual_tokens": float(keep),
                         "tflops_prefill": 3e-5 + keep * 5e-7 + (method == "fastv") * 1e-5,
                         "prefill_ms": 5.0})  # fmt: skip
    pixels = _pixels(Report(rows, {"title": "t"}).plot(tmp_path / "report.png"))
    for method in ("fastv", "random"):
        assert _count(pixels, method_style(method).colour) > 100, method
    flops_axis = figures[-1].axes[0]
    assert flops_axis.get_ylabel() == "prefill GFLOPs" and flops_axis.yaxis.get_offset_text().get_text() == ""
    assert _tick_texts(flops_axis.xaxis) == ["4", "8", "16", "32", "64"]


# -- show ----------------------------------------------------------------------------------------------------------


def _draw(image: torch.Tensor, kept: torch.Tensor, path, cell: int = 40) -> np.ndarray:
    """One panel filling its whole figure: pixel (x, y) is cell (x // cell, y // cell)."""
    rows, cols = kept.shape
    figure = Figure(figsize=(cols * cell / 100, rows * cell / 100), dpi=100)
    axis = figure.add_axes((0, 0, 1, 1))
    draw_kept(axis, image, (kept, torch.zeros_like(kept)), "")
    figure.savefig(path, dpi=100)
    return _pixels(path)


def _lattice() -> torch.Tensor:
    kept = torch.zeros(6, 6, dtype=torch.bool)
    kept[1::3, 1::3] = True  # four isolated cells, (1, 1), (1, 4), (4, 1), (4, 4)
    kept[2, 1] = True  # and one below (1, 1): a 2-cell region
    return kept


def test_kept_patches_are_outlined_on_a_black_image(tmp_path):
    kept, cell = _lattice(), 40
    pixels = _draw(torch.zeros(24, 24, 3), kept, tmp_path / "black.png", cell)
    outline, dropped = np.array(to_rgb(KEPT_OUTLINE)) * 255, np.array(DROPPED_TINT) * DROPPED_MIX * 255
    for r, c in kept.nonzero().tolist():
        middle = (r * cell + cell // 2, c * cell + cell // 2)
        assert np.abs(pixels[middle] - 0).max() <= 2  # a kept black patch stays black ...
        if not kept[r - 1, c]:  # ... with the outline colour on its top edge
            assert np.abs(pixels[r * cell, c * cell + cell // 2] - outline).max() <= 30, (r, c)
        assert np.abs(pixels[r * cell + cell // 2, c * cell] - outline).max() <= 30, (r, c)  # and its left edge
    assert np.abs(pixels[2 * cell, 1 * cell + cell // 2] - outline).max() > 60  # no outline inside a region
    corner = pixels[cell // 2, cell // 2]  # a dropped black patch is tinted, not black like the kept ones
    assert np.abs(corner - dropped).max() <= 3 and corner.min() > 40
    assert _count(pixels, KEPT_OUTLINE, 30) > 5 * 4 * cell  # about four edges per kept cell
    assert len(outline_segments(kept)) == 3 * 4 + 6  # three single cells, one 2-cell region


def test_kept_patches_stand_out_on_a_white_image(tmp_path):
    kept, cell = _lattice(), 40
    pixels = _draw(torch.ones(24, 24, 3), kept, tmp_path / "white.png", cell)
    assert (pixels[4 * cell + cell // 2, 4 * cell + cell // 2] >= 253).all()  # kept: white
    assert (pixels[cell // 2, 3 * cell + cell // 2] < 200).any()  # dropped: washed out, not white
    edge = pixels[1 * cell - 6 : 1 * cell + 7, 4 * cell + cell // 2]  # across the top edge of the kept (1, 4)
    assert _count(edge[None], KEPT_OUTLINE, 30) >= 1 and (edge.max(-1) < 60).any()  # yellow over a black halo


def test_show_outlines_kept_patches_of_a_black_image_and_has_a_legend(tmp_path, figures):
    from tests.helpers import Image, make_batch, tiny_model

    model = tiny_model("llava")
    batch = make_batch(model, [[5, Image(), 7]])
    batch["pixel_values"] = torch.full_like(batch["pixel_values"], -10.0)  # black once un-normalised and clamped
    written = show(model, batch, ["uniform", "pool"], 16, tmp_path)
    for path in written:
        assert _count(_pixels(path), KEPT_OUTLINE, 30) > 400, path.name
    labels = [t.get_text() for t in figures[-1].legends[0].get_texts()]
    assert labels == ["kept (outlined)", "dropped (greyed)", "kept, merged features"]


# -- dtop ------------------------------------------------------------------------------------------------------------


def test_dtop_exits_picture_has_class_and_exit_block_legends(tmp_path, figures):
    pytest.importorskip("timm")
    from vtprune.data.digit_scenes import scenes
    from vtprune.embedded.segmenter import load_segmenter, to_tensor
    from vtprune.eval.segmentation import plot_exits

    model = load_segmenter()
    pixels, labels = scenes("test", 0, 2, seed=1000)
    path = plot_exits(model, pixels, to_tensor(pixels), torch.from_numpy(labels), 0.9, tmp_path / "exits.png")
    classes, exits = figures[-1].legends
    assert classes.get_title().get_text().startswith("class") and exits.get_title().get_text() == "exit block"
    names = [t.get_text() for t in classes.get_texts()]
    present = sorted({int(v) for v in np.unique(labels)})
    assert names[0] == "background" and all(str(v - 1) in names for v in present if v)
    depth = len(model.backbone.blocks)
    blocks = [f"after block {b + 1}" for b in model.stages[:-1]] + [f"ran all {depth} blocks"]
    assert [t.get_text() for t in exits.get_texts()] == blocks
    picture = _pixels(path)
    for patch in exits.get_patches():  # each exit colour is drawn (legend swatch at least) in the picture
        assert _count(picture, tuple(np.array(patch.get_facecolor()[:3]) * 255), 3) > 0


def test_the_sweep_table_shows_tokens_per_layer_only_where_they_differ_from_the_kept_count():
    from rich.console import Console

    from vtprune.eval.sweep_report import table

    def record(method, kept, per_layer):
        return {"task": "t", "metric": "accuracy", "method": method, "keep": kept, "score": 0.9, "vs_dense": 1.0,
                "tflops": 1.0, "prefill_ms": 1.0, "visual_tokens": kept, "sample_visual_tokens": kept,
                "visual_tokens_per_layer": per_layer}  # fmt: skip

    def shown(records):
        console = Console(width=200, record=True)
        console.print(table(records))
        return console.export_text()

    assert "tokens / layer" not in shown([record("random", 8, 8.0), record("pool", 4, 4.0)])
    text = shown([record("random", 8, 8.0), record("dyvte", 0, 21.1)])  # DyVTE keeps none at the end
    assert "tokens / layer" in text and "21.1" in text
