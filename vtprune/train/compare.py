"""The trained methods against every training-free one, on the embedded LLaVA's held-out questions.

    python -m vtprune.train.compare [--docs 400] [--keeps 32,16,8,4] [--out vtprune-compare.jsonl]

Every method the embedded model takes (``vtprune demo``'s list) runs at each keep on the same held-out documents;
each point records accuracy, the visual tokens per decoder layer and the LLM prefill GFLOPs per sample (from the
wrapped model's records). Then, for each trained point, the best training-free point at equal or lower FLOPs and the
best at equal or fewer visual tokens per layer (2 % tolerance). Points are appended as they finish and reused on a
rerun, so an interrupted run resumes. The README's table is ``vtprune/embedded/trained/comparison.jsonl`` (the
repository's copy; pass it as ``--out`` to reprint it without rerunning).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import vtprune
from vtprune.train.common import evaluate, held_out_docs, load_frozen

TOLERANCE = 1.02  # "equal" cost: within 2 %
DEFAULT_OUT = Path("vtprune-compare.jsonl")


def best_within(points: list[dict[str, Any]], key: str, limit: float) -> dict[str, Any] | None:
    """The most accurate point whose ``key`` is at most ``limit`` (times the tolerance)."""
    eligible = [p for p in points if p[key] <= limit * TOLERANCE]
    return max(eligible, key=lambda p: p["accuracy"], default=None)


def matched(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per trained point: the best training-free point at equal-or-lower FLOPs and at equal-or-fewer tokens."""
    trained = [p for p in points if p["trained"]]
    free = [p for p in points if not p["trained"] and p["method"] != "dense"]
    return [
        {
            "trained": point,
            "best_at_flops": best_within(free, "llm_gflops", point["llm_gflops"]),
            "best_at_tokens": best_within(free, "visual_tokens_per_layer", point["visual_tokens_per_layer"]),
        }
        for point in trained
    ]


def run(docs: int, keeps: list[int], out: Path, threads: int = 2) -> list[dict[str, Any]]:
    """Evaluate every applicable method at ``keeps`` (reusing the points ``out`` already holds)."""
    from rich.progress import Progress

    from vtprune.demo import applicable_methods

    torch.set_num_threads(threads)
    model, processor = load_frozen()
    held_out = held_out_docs(docs)
    methods, _ = applicable_methods()
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            point = json.loads(line)
            if point["docs"] == docs:
                done[(point["method"], point["keep"])] = point
    todo = [("dense", None)] + [(m, k) for m in methods for k in keeps]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Progress() as progress, out.open("a") as sink:
            task = progress.add_task("methods x keeps", total=len(todo))
            for method, keep in todo:
                if (method, keep) not in done:
                    figures = evaluate(model, processor, held_out, None if method == "dense" else method, keep or 1.0)
                    point = {
                        "method": method, "keep": keep, "docs": docs,
                        "trained": method != "dense" and bool(getattr(vtprune.method_class(method, ("llm", "vit")),
                                                                      "trained", False)),
                        "accuracy": figures["accuracy"]["mean over types"], "per_type": figures["accuracy"],
                        "visual_tokens_per_layer": figures["visual_tokens_per_layer"],
                        "llm_gflops": figures["llm_gflops"],
                    }  # fmt: skip
                    sink.write(json.dumps(point) + "\n")
                    sink.flush()
                    done[(method, keep)] = point
                progress.advance(task)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume from {out}")
        raise SystemExit(130) from None
    return [done[key] for key in todo]


def table(points: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    dense = next(p for p in points if p["method"] == "dense")
    view = Table(title=f"trained vs training-free, {dense['docs']} held-out questions (dense {dense['accuracy']:.3f})")
    for header in ("trained point", "acc", "tokens/layer", "GFLOPs", "best free at <= GFLOPs", "acc",
                   "best free at <= tokens/layer", "acc"):  # fmt: skip
        view.add_column(header, justify="left" if "point" in header or "best" in header else "right")

    def label(point: dict[str, Any] | None) -> str:
        if point is None:
            return "-"
        return f"{point['method']} {point['keep']} ({point['visual_tokens_per_layer']:.1f} / {point['llm_gflops']:.3f})"

    for row in matched(points):
        mine, flops, tokens = row["trained"], row["best_at_flops"], row["best_at_tokens"]
        view.add_row(
            f"{mine['method']} {mine['keep']}", f"{mine['accuracy']:.3f}", f"{mine['visual_tokens_per_layer']:.1f}",
            f"{mine['llm_gflops']:.3f}", label(flops), "-" if flops is None else f"{flops['accuracy']:.3f}",
            label(tokens), "-" if tokens is None else f"{tokens['accuracy']:.3f}",
        )  # fmt: skip
    return view


def main() -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(description="Trained methods vs every training-free method, held out.")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--keeps", default="32,16,8,4")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    points = run(args.docs, [int(k) for k in args.keeps.split(",")], args.out, args.threads)
    Console().print(table(points))


if __name__ == "__main__":
    main()
