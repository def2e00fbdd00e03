"""Command line: ``vtprune demo``, ``methods``, ``report``, ``show``, ``sweep``, ``plot``, ``tasks``, ``dtop``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Prune the visual tokens of vision-language models.", no_args_is_help=True, add_completion=False)


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", help="Show lmms-eval's and transformers' logs and progress bars (hidden by default)."
    ),
) -> None:
    """Prune the visual tokens of vision-language models."""
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """lmms-eval logs DEBUG lines through loguru while it indexes its tasks, and transformers and lmms-eval draw
    tqdm bars per checkpoint and per task: our own rich progress says what is going on, so theirs stay hidden
    (warnings still show)."""
    import sys

    import tqdm

    # lmms-eval passes disable= itself and tqdm reads TQDM_DISABLE only at import, so neither switch reaches its
    # bars: every tqdm bar of this process is turned off here (the CLI's own bars are rich)
    draw = tqdm.std.tqdm.__init__

    def hidden(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        draw(self, *args, **kwargs)

    if not getattr(draw, "_vtprune_hidden", False):
        hidden._vtprune_hidden = True  # type: ignore[attr-defined]
        tqdm.std.tqdm.__init__ = hidden
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from loguru import logger
    except ImportError:  # lmms-eval (and with it loguru) is an optional extra
        return
    logger.remove()
    # a sink that looks sys.stderr up per message, so a redirected stream (tests, notebooks) gets the lines
    logger.add(lambda message: sys.stderr.write(message), level="WARNING")


def _interrupted(saved: str) -> typer.Exit:
    """Ctrl-C: say what is kept and how to go on, then exit 130 as shells expect."""
    Console(stderr=True).print(f"\n[yellow]Interrupted.[/yellow] {saved}")
    return typer.Exit(130)


def parse_keep(text: str) -> int | float | tuple:
    """'64' -> 64 (tokens), '0.25' -> 0.25 (fraction), '128/64' -> (128, 64) (per part of a composed method);
    anything else is a clear error."""
    from vtprune.core.budget import parse_budget

    try:
        return parse_budget(text)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from None


def _split(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


@app.command()
def tour(
    family: str = typer.Option(None, help="Comma-separated families (default: all of them)."),
    methods: str = typer.Option(
        "random,uniform,fastv,vtc_cls,visionzip,transprune", help="Comma-separated registered methods."
    ),
    keep: str = typer.Option(
        "0.25", help="Tokens kept per image (int) or a fraction in (0, 1]; the default suits every tiny family's images."
    ),
) -> None:
    """Wrap tiny random models of every family, generate, and print what each method kept."""
    from vtprune.testing import FAMILIES
    from vtprune.tour import run_tour

    families = _split(family)
    unknown = sorted(set(families or []) - set(FAMILIES))
    if unknown:
        raise typer.BadParameter(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    try:
        budget = parse_keep(keep)
        run_tour(families, _split(methods), budget)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error


@app.command()
def demo(
    methods: str = typer.Option(None, help="Comma-separated methods (default: every registered one that applies)."),
    keep: str = typer.Option("32,16,8,4", help="Comma-separated budgets (the embedded model sees 64 tokens)."),
    limit: int = typer.Option(200, min=1, help="Held-out documents per point."),
    out: Path = typer.Option(Path("vtprune-demo"), help="Folder for results.jsonl, summary.csv, pareto.png."),
    batch_size: int = typer.Option(50, min=1, help="Prompts per generate call."),
    model: str = typer.Option("embedded", help="embedded (the digits LLaVA) or embedded-qwen (its Qwen2-VL twin)."),
) -> None:
    """The main job: sweep the methods at several budgets on an embedded digits model through lmms-eval."""
    from vtprune.core.budget import validate_keep
    from vtprune.demo import applicable_methods
    from vtprune.embedded import MODELS

    if model not in MODELS:
        raise typer.BadParameter(f"model must be one of {', '.join(MODELS)} (the demo's models), got {model!r}")
    keeps = [parse_keep(part) for part in _split(keep) or []]
    try:  # once here, before every method is probed with it
        for part in (p for k in keeps for p in (k if isinstance(k, tuple) else (k,))):
            validate_keep(part)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    names = _split(methods)
    if names is None:
        budgets = [k for k in keeps if isinstance(k, int)]
        names, skipped = applicable_methods(min(budgets, default=4), model)
        for name, reason in skipped.items():
            Console().print(f"[dim]{name}: skipped ({reason})[/dim]")
    sweep(model=model, methods=",".join(names), keep=keep, tasks="vtprune_digits", limit=limit, out=out,
          budget="final", budget_unit="video", batch_size=batch_size, device=None, dtype="auto", include_path=None,
          option=[], metric="type_accuracy", use_ray=False, ray_address=None, ray_workers=None)  # fmt: skip


@app.command("methods")
def list_methods_command() -> None:
    """List the registered pruning methods."""
    import dataclasses

    import vtprune
    from vtprune.core.registry import METHOD_KINDS

    table = Table(title="vtprune methods")
    for column in ("name", "summary", "paper", "defaults"):
        table.add_column(column)
    for kind in METHOD_KINDS:  # LLM-side, then ViT-side, then trained
        for name in vtprune.list_methods(kind):
            cls = vtprune.method_class(name, kind)
            if kind == "trained":
                table.add_row(name, cls.summary, cls.paper, cls.defaults)
                continue
            config = cls()
            # what an LLM-side config saves (a preset such as infohorizon leaves out the parts it builds)
            saved = config.to_dict() if isinstance(config, vtprune.Method) else dataclasses.asdict(config)
            options = {k: v for k, v in saved.items() if k != "method"}
            defaults = ", ".join(f"{k}={v}" for k, v in options.items())
            where = " [ViT: timm / open_clip / CLIP, and LLaVA-1.5's tower]" if kind == "vit" else ""
            if getattr(cls, "trained", False):  # wraps a VLM, with modules trained by python -m vtprune.train.<name>
                where += f" [trained: python -m vtprune.train.{name}]"
            table.add_row(name, config.summary + where, config.paper, defaults)
    Console().print(table)


@app.command("dtop")
def dtop_command(
    thresholds: str = typer.Option("1.0,0.99,0.98,0.97,0.95", help="Comma-separated exit thresholds (1.0 = dense)."),
    images: int = typer.Option(300, min=1, help="Held-out digit scenes to evaluate."),
    flop_images: int = typer.Option(None, min=1, help="Scenes whose FLOPs are counted one by one (default: all)."),
    segmenter: Path = typer.Option(None, help="A folder saved by python -m vtprune.embedded.train_dtop "
                                              "(default: the shipped one)."),
    out: Path = typer.Option(Path("vtprune-dtop/results.jsonl"), help="JSON lines, one row per threshold; rows "
                                                                      "already there are reused."),
    pictures: int = typer.Option(4, min=0, help="Scenes drawn (image, truth, prediction, exit blocks) into "
                                                "exits.png beside --out, at the lowest threshold."),
) -> None:
    """DToP on the embedded digit-scene segmenter: mIoU and GFLOPs per image at each exit threshold."""
    import torch
    from rich.progress import Progress

    from vtprune.data.digit_scenes import scenes
    from vtprune.embedded.segmenter import load_segmenter, to_tensor
    from vtprune.eval.segmentation import evaluate_thresholds, plot_exits

    values = []
    for part in _split(thresholds) or []:
        try:
            values.append(float(part))
        except ValueError:
            raise typer.BadParameter(f"thresholds must be numbers in [0, 1], got {part!r}") from None
        if not 0.0 <= values[-1] <= 1.0:
            raise typer.BadParameter(f"thresholds must be numbers in [0, 1], got {part!r}")
    model = load_segmenter(segmenter)
    pixels, labels = scenes("test", 0, images, seed=1000)
    console = Console()
    try:  # a bar over thresholds x scenes, a line per finished threshold, a line for rows reused from --out
        with Progress(console=console, transient=True) as progress:
            rows = evaluate_thresholds(model, to_tensor(pixels), torch.from_numpy(labels), values, out=out,
                                       flop_images=flop_images, progress=progress, console=console)  # fmt: skip
    except KeyboardInterrupt:
        done = sum(1 for line in out.read_text().splitlines() if line.strip()) if out.is_file() else 0
        raise _interrupted(f"{done} thresholds saved in {out}; rerun the same command to resume.") from None
    dense = next((row for row in rows if row["thresh"] >= 1.0), None)
    table = Table(title=f"DToP on {images} held-out digit scenes ({out})")
    for column in ("thresh", "mIoU", "GFLOPs / image", "vs dense", "token-blocks run", "tokens exited after block"):
        table.add_column(column, justify="right")
    for row in rows:
        ratio = f"{row['gflops'] / dense['gflops']:.3f}" if dense else "-"
        exits = ", ".join(f"{int(k) + 1}: {v}" for k, v in row["exited_after_block"].items())
        table.add_row(f"{row['thresh']:g}", f"{row['miou']:.4f}", f"{row['gflops']:.4f}", ratio,
                      f"{row['token_blocks']:.3f}", exits)  # fmt: skip
    console.print(table)
    if pictures and values:
        shown = min(pictures, images)
        picture = plot_exits(model, pixels[:shown], to_tensor(pixels[:shown]), torch.from_numpy(labels[:shown]),
                             min(values), out.parent / "exits.png")  # fmt: skip
        console.print(f"wrote {picture}")


MODEL_HELP = (
    "A checkpoint folder or organisation/name hub id (loaded with from_pretrained and its processor), embedded "
    "(the trained digits LLaVA shipped in the package), embedded-qwen (its Qwen2-VL twin), or a random model: "
    "tiny:<family> (llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5, gemma3, "
    "mistral3, internvl, glm4v, smolvlm, paligemma), "
    "shaped:llava (LLaVA-1.5-shaped, 576 image tokens)."
)


def _load(
    model: str, image: Path | None, prompt: str, dtype: str, device: str, video: Path | None = None
) -> tuple:
    """(model, inputs, tokenizer, prompt) for a command, with bad input turned into a clear usage error."""
    from vtprune.embedded import MODELS
    from vtprune.eval.inputs import embedded_example, load_model, prepare_inputs

    try:
        loaded, processor = load_model(model, dtype=dtype, device=device)
        picture: Path | object | None = image
        if video is not None and image is not None:
            raise ValueError("give --image or --video, not both")
        if model in MODELS and image is None and video is None:
            picture, prompt = embedded_example(prompt)
        inputs = prepare_inputs(loaded, processor, image=picture, prompt=prompt, video=video)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    return loaded, inputs, getattr(processor, "tokenizer", None), prompt


def _check_methods(model, names: list[str], keeps: list, budget: str, tokenizer, budget_unit: str = "video") -> None:
    """Fail before measuring anything when a method or budget does not apply to the model."""
    import vtprune

    for name in names:
        for value in keeps:
            try:
                pruning = vtprune.wrap(
                    model, name, keep=value, budget=budget, budget_unit=budget_unit, tokenizer=tokenizer
                )
                pruning.unwrap()
            except (ValueError, TypeError) as error:
                raise typer.BadParameter(str(error)) from error


@app.command()
def report(
    model: str = typer.Option("shaped:llava", help=MODEL_HELP),
    methods: str = typer.Option("fastv,random", help="Comma-separated registered methods."),
    keep: str = typer.Option("576,192,128,64", help="Comma-separated budgets: tokens per image or fractions."),
    out: Path = typer.Option(Path("vtprune-report"), help="Folder for report.json, report.csv and report.png."),
    image: Path = typer.Option(None, help="Image for the prompt (required with a checkpoint; embedded: a digit grid)."),
    video: Path = typer.Option(
        None, help="Folder of video frames (images, in name order) for the prompt instead of an image; a family with "
        "video input (random models: random frames, as many as the folder holds)."
    ),
    prompt: str = typer.Option("Describe the image in detail.", help="Question asked about the image."),
    budget: str = typer.Option("final", help="What keep counts: final or average (see the README)."),
    budget_unit: str = typer.Option("video", help="What keep counts on a video: video (all its frames) or frame."),
    new_tokens: int = typer.Option(8, min=1, help="Tokens generated per timed run (decode speed)."),
    repeats: int = typer.Option(3, min=1, help="Timed runs per row; medians are reported."),
    warmup: int = typer.Option(1, min=0, help="Untimed runs before timing each row."),
    device: str = typer.Option("cpu", help="Device to run on, e.g. cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16 (checkpoints only)."),
) -> None:
    """FLOPs, latency and memory of the dense model and of every (method, keep): table, JSON, CSV and plots."""
    from rich.progress import Progress

    from vtprune.eval.report import build_report

    names = _split(methods) or []
    try:
        keeps = [parse_keep(part) for part in _split(keep) or []]
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    if not names or not keeps:
        raise typer.BadParameter("methods and keep each need at least one value")
    loaded, inputs, tokenizer, _ = _load(model, image, prompt, dtype, device, video)
    _check_methods(loaded, names, keeps, budget, tokenizer, budget_unit)
    out.mkdir(parents=True, exist_ok=True)

    def save(partial) -> None:  # after every row: an interrupted run keeps what it measured
        partial.context["model"] = model
        partial.to_json(out / "report.json")
        partial.to_csv(out / "report.csv")

    saved = []

    def save_row(partial) -> None:
        save(partial)
        saved[:] = [len(partial.rows)]

    try:
        with Progress(transient=True) as progress:
            result = build_report(
                loaded, inputs, names, keeps, budget=budget, budget_unit=budget_unit, new_tokens=new_tokens,
                warmup=warmup, repeats=repeats, tokenizer=tokenizer, progress=progress, on_row=save_row,
            )  # fmt: skip
    except KeyboardInterrupt:
        rows = saved[0] if saved else 0
        raise _interrupted(f"{rows} rows measured so far are in {out / 'report.json'} and {out / 'report.csv'}; "
                           "rerun the command to measure every row again.") from None  # fmt: skip
    result.plot(out / "report.png")
    console = Console()
    if not console.is_terminal:  # piped into a file: do not squeeze the table into 80 columns
        console = Console(width=170)
    console.print(result.table())
    console.print(f"wrote {out / 'report.json'}, {out / 'report.csv'}, {out / 'report.png'}")


@app.command()
def show(
    image: Path = typer.Option(None, help="Image to prune (required with a checkpoint; embedded: a digit grid; "
                                          "random pixels otherwise)."),
    methods: str = typer.Option("vtc_cls,fastv,divprune", help="Comma-separated registered methods."),
    keep: str = typer.Option("64", help="Tokens kept per image (int) or a fraction in (0, 1]."),
    model: str = typer.Option("shaped:llava", help=MODEL_HELP),
    prompt: str = typer.Option("Describe the image in detail.", help="Question asked about the image."),
    out: Path = typer.Option(Path("vtprune-show"), help="Folder for <method>.png and methods.png."),
    device: str = typer.Option("cpu", help="Device to run on, e.g. cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16 (checkpoints only)."),
) -> None:
    """One picture per method with the patches it keeps highlighted, and all of them side by side."""
    from vtprune.eval.show import show as draw

    names = _split(methods) or []
    try:
        budget = parse_keep(keep)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    if not names:
        raise typer.BadParameter("methods needs at least one value")
    loaded, inputs, tokenizer, prompt = _load(model, image, prompt, dtype, device)
    _check_methods(loaded, names, [budget], "final", tokenizer)
    shown_prompt = prompt if tokenizer is not None else "random tokens (random model, no tokenizer)"
    try:
        written = draw(loaded, inputs, names, budget, out, prompt=shown_prompt, tokenizer=tokenizer)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    Console().print("wrote " + ", ".join(str(path) for path in written))


def _parse_options(pairs: list[str]) -> dict:
    """``["layer=3", "query=all"]`` -> ``{"layer": 3, "query": "all"}`` (ints, floats and booleans converted)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"option must look like name=value, got {pair!r}")
        name, text = pair.split("=", 1)
        value: object = text
        for convert in (int, float):
            try:
                value = convert(text)
                break
            except ValueError:
                continue
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        options[name.strip()] = value
    return options


def _print_sweep(out: Path, metric: str | None, setup: int | None = None) -> None:
    from vtprune.eval.sweep_report import table, write_reports

    records, csv_path, png_path = write_reports(out, metric, setup)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(table(records, title=f"sweep in {out}"))
    console.print(f"wrote {csv_path}, {png_path} (all points: {out / 'results.jsonl'})")


@app.command()
def sweep(
    model: str = typer.Option("embedded", help="Checkpoint directory or hub id with its processor; default: the "
                                                "embedded digits model."),  # fmt: skip
    methods: str = typer.Option("fastv,vtc_cls,random", help="Comma-separated registered methods (dense runs once)."),
    keep: str = typer.Option(None, help="Comma-separated budgets: tokens per image or fractions (default: halvings "
                                        "of the model's tokens per image, e.g. 32,16,8,4 of 64; fractions "
                                        "0.5..0.0625 where the count depends on the image)."),  # fmt: skip
    tasks: str = typer.Option("vtprune_digits", help="Comma-separated lmms-eval tasks (local: vtprune_digits, "
                                                      "vtprune_digits_yesno, vtprune_digits_icl, "
                                                      "vtprune_digits_video)."),  # fmt: skip
    limit: float = typer.Option(None, help="Documents per task (int) or a fraction of them."),
    out: Path = typer.Option(Path("vtprune-sweep"), help="Folder for results.jsonl, summary.csv, pareto.png."),
    budget: str = typer.Option("final", help="What keep counts: final or average."),
    budget_unit: str = typer.Option("video", help="What keep counts on a video: video (the whole video's tokens; a "
                                                  "method may spread them over its frames) or frame (each frame's)."),
    batch_size: int = typer.Option(1, min=1, help="Prompts per generate call."),
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    include_path: str = typer.Option(None, help="Another folder of lmms-eval task YAMLs."),
    option: list[str] = typer.Option([], help="A method option as name=value (repeatable), e.g. --option layer=3."),
    metric: str = typer.Option(None, help="Metric to plot (default: each task's first)."),
    use_ray: bool = typer.Option(False, "--ray", help="Run grid points as Ray tasks on a local Ray instance."),
    ray_address: str = typer.Option(None, help="Address of a running Ray cluster (implies --ray)."),
    ray_workers: int = typer.Option(None, help="Ray actors, one model copy each (default: one per GPU, else 2)."),
) -> None:
    """Evaluate dense once and every (method, keep) through lmms-eval; resumable; table, CSV and Pareto plot."""
    from rich.progress import Progress

    from vtprune.eval.inputs import check_model_spec

    from vtprune.eval.sweep import GridPoint, SweepSpec, default_keeps, image_tokens, run_sweep, validate

    try:
        if keep is None:
            check_model_spec(model)
            keeps = default_keeps(model)
            tokens = image_tokens(model)
            of = f"of its {tokens} tokens per image" if tokens else "(its tokens per image depend on the image)"
            Console().print(f"budgets for {model} {of}: {', '.join(f'{k:g}' for k in keeps)} (set them with --keep)")
        else:
            keeps = [parse_keep(part) for part in _split(keep) or []]
        spec = SweepSpec(
            model=model, methods=_split(methods) or [], keeps=keeps, tasks=_split(tasks) or [], out_dir=str(out),
            limit=int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit,
            budget=budget, batch_size=batch_size, device=device, dtype=dtype, include_path=include_path,
            options=_parse_options(option), budget_unit=budget_unit,
        )  # fmt: skip
        validate(spec)  # before the progress bar: bad arguments fail at once
        with Progress() as progress:
            task = progress.add_task("sweep", total=None)

            def started(total: int, pending: int) -> None:
                if total > pending:
                    progress.console.print(f"{total - pending} of {total} points already in {out}; skipping them")
                progress.update(task, total=pending, completed=0)

            requests = progress.add_task("requests", total=None, visible=False)

            def point_started(point: GridPoint) -> None:
                progress.update(requests, description=f"  {point.label}", completed=0, total=None, visible=True)

            def request_done(done: int, total: int) -> None:
                progress.update(requests, completed=done, total=total)

            def finished(row: dict) -> None:
                label = GridPoint(row["method"], row.get("keep")).label
                progress.console.print(f"done {label} in {row['seconds']:.1f} s")
                progress.update(requests, visible=False)
                progress.advance(task)

            run_sweep(spec, ray=use_ray, ray_address=ray_address, ray_workers=ray_workers, on_start=started,
                      on_row=finished, on_point=point_started, on_request=request_done)  # fmt: skip
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    except KeyboardInterrupt:
        from vtprune.eval.sweep import saved_points

        raise _interrupted(f"{saved_points(spec)} points saved in {out}; rerun the same command to resume.") from None
    _print_sweep(out, metric)


@app.command()
def plot(
    out: Path = typer.Argument(..., help="A sweep folder (holding results.jsonl)."),
    metric: str = typer.Option(None, help="Metric to plot (default: each task's first)."),
    setup: int = typer.Option(None, help="Only this setup of the folder, by number (1 = first written); default: "
                                         "every setup, named in the table and the plot."),
) -> None:
    """Table, summary.csv and pareto.png from a sweep folder (also while it still runs)."""
    try:
        _print_sweep(out, metric, setup)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


@app.command()
def tasks(
    folder: Path = typer.Option(None, "--dir", help="Where to write the YAMLs (default ~/.cache/vtprune/lmms_tasks)."),
) -> None:
    """Write the local lmms-eval task YAMLs and print their folder, for `python -m lmms_eval --include_path`."""
    from vtprune.eval.tasks import task_dir

    print(task_dir(folder))


if __name__ == "__main__":
    app()
