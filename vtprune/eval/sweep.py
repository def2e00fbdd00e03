"""Pruning-ratio sweeps through lmms-eval: the dense model once, then every (method, keep), resumable.

Every finished grid point is appended at once to ``<out>/results.jsonl`` (one JSON line, written with a single
``write`` on an append-only descriptor, then fsynced), so a sweep that is killed keeps every finished point, and a
rerun with the same folder skips them. A line cut short by a kill is ignored and the point is evaluated again.
Points run in this process (one model, wrapped and unwrapped per point) or as Ray tasks on a pool of actors, each
holding one copy of the model (one GPU each where there are GPUs).

``budget_unit`` (what ``keep`` counts on a video: ``"video"``, the default, or ``"frame"``) is part of a sweep's
setup: it is written in every row's ``setup``, so points at another unit are other points (a rerun with another unit
evaluates them, dense included, and the report names the unit where a folder holds both). Rows written before the
unit existed count as ``"video"``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from vtprune.core.budget import BUDGET_CONVENTIONS, BUDGET_UNITS, budget_label, validate_keep
from vtprune.core.compose import Compose
from vtprune.core.registry import WRAPPABLE, make_method
from vtprune.eval.inputs import check_model_spec

RESULTS_FILE = "results.jsonl"
DENSE = "dense"


@dataclass(frozen=True)
class GridPoint:
    """One evaluation: ``method`` (or ``dense``) at ``keep`` tokens per image (None for dense; a tuple, one budget
    per part, for a composed method such as ``divprune+random`` at ``(128, 64)``)."""

    method: str
    keep: int | float | tuple[int | float, ...] | None = None

    @property
    def label(self) -> str:
        return self.method if self.keep is None else f"{self.method}@{budget_label(self.keep)}"


@dataclass
class SweepSpec:
    """What a sweep evaluates; ``setup()`` is the part a result must match to count as already done."""

    model: str
    methods: list[str]
    keeps: list[int | float | tuple[int | float, ...]]
    tasks: list[str]
    out_dir: str
    limit: int | float | None = None
    budget: str = "final"
    batch_size: int = 1
    device: str | None = None
    dtype: str = "auto"
    include_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    budget_unit: str = "video"

    def setup(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": sorted(self.tasks), "limit": self.limit, "budget": self.budget,
                "budget_unit": self.budget_unit, "options": self.options}  # fmt: skip

    def grid(self) -> list[GridPoint]:
        """Dense first (once, not once per method), then methods x keeps in the order given."""
        return [GridPoint(DENSE)] + [GridPoint(m, k) for m in self.methods for k in self.keeps]


# the default budgets: halvings of an image's tokens (the embedded model's 64 -> 32, 16, 8, 4)
DEFAULT_SHARES = (2, 4, 8, 16)


def image_tokens(model: str) -> int | None:
    """Visual tokens per image of ``model``'s fixed-size tower, from its config alone (no weights loaded); None
    where the count depends on the image (dynamic resolution, any-resolution crops) or is not known."""
    config = _config_of(model)
    vision = getattr(config, "vision_config", None)
    if vision is None or hasattr(vision, "spatial_merge_size") or getattr(config, "image_grid_pinpoints", None):
        return None
    if getattr(config, "mm_tokens_per_image", None):  # Gemma 3 pools its tower to a fixed count
        return int(config.mm_tokens_per_image)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or type(config).__name__ not in _PLAIN_GRIDS:
        return None
    return (size // patch) ** 2


# families whose image is one square grid of tower patches, every patch one LLM token
_PLAIN_GRIDS = ("LlavaConfig", "PaliGemmaConfig")


def _config_of(model: str) -> Any:
    from vtprune.eval.inputs import SYNTHETIC

    if model in SYNTHETIC:
        from vtprune.testing import llava_shaped_model, tiny_model

        # tiny models build in milliseconds; the LLaVA-shaped one only on meta, for its config
        if model == "shaped:llava":
            import torch

            with torch.device("meta"):
                return llava_shaped_model().config
        return tiny_model(model.split(":", 1)[1]).config
    from transformers import AutoConfig

    from vtprune.embedded import MODELS, model_dir

    return AutoConfig.from_pretrained(str(model_dir(model)) if model in MODELS else model)


def default_keeps(model: str) -> list[int | float]:
    """Budgets for a sweep that names none: halvings of the model's tokens per image (32, 16, 8, 4 of 64; 288 .. 36
    of LLaVA-1.5's 576), or the fractions 1/2 .. 1/16 where the count depends on the image (Qwen-VL, LLaVA-NeXT)."""
    tokens = image_tokens(model)
    if tokens is None:
        return [1 / share for share in DEFAULT_SHARES]
    return sorted({max(1, tokens // share) for share in DEFAULT_SHARES}, reverse=True)


def validate(spec: SweepSpec) -> None:
    """Every check that needs no model: raise before any work starts."""
    if not spec.methods or not spec.keeps:
        raise ValueError("the grid is empty: give at least one method (--methods) and one budget (--keep)")
    if not spec.tasks:
        raise ValueError("tasks is empty: give at least one lmms-eval task (--tasks)")
    if spec.budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit must be one of {BUDGET_UNITS} (what keep counts on a video), got "
                         f"{spec.budget_unit!r}")  # fmt: skip
    for name in spec.methods:
        if name == DENSE:
            raise ValueError("dense is always evaluated once; leave it out of methods")
        config = make_method(name, kind=WRAPPABLE, **spec.options)
        for part in config.parts if isinstance(config, Compose) else (config,):
            units = getattr(part, "budget_units", BUDGET_UNITS)  # EVS moves budget between frames: "video" only
            if spec.budget_unit not in units:
                raise ValueError(f"{part.name} accepts budget_unit {' or '.join(map(repr, units))}, not "
                                 f"{spec.budget_unit!r} (--budget-unit)")  # fmt: skip
    for keep in spec.keeps:
        for part in keep if isinstance(keep, (tuple, list)) else (keep,):
            validate_keep(part)
    if spec.budget not in BUDGET_CONVENTIONS:
        raise ValueError(f"budget must be one of {BUDGET_CONVENTIONS}, got {spec.budget!r}")
    if spec.limit is not None and not spec.limit > 0:
        raise ValueError(f"limit must be positive, got {spec.limit}")
    if spec.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {spec.batch_size}")
    check_model_spec(spec.model)


# -- results file ----------------------------------------------------------------------------------------------------


def _as_keep(value: Any) -> Any:
    """JSON gives per-part budgets back as a list; the grid holds them as a tuple."""
    return tuple(value) if isinstance(value, list) else value


def point_key(setup: dict[str, Any], point: GridPoint) -> str:
    return json.dumps({**setup, "method": point.method, "keep": point.keep}, sort_keys=True, default=str)


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl`` that a sweep wrote whole. Any other line (cut by a kill, edited by hand, missing
    the method or its metrics) is skipped with a warning naming the file and line, so one bad line never hides the
    rest."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            warnings.warn(f"{path}:{number}: not JSON ({error.msg}; a run killed mid-write?), skipped", stacklevel=2)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("method"), str) or not isinstance(row.get("metrics"), dict):
            warnings.warn(f"{path}:{number}: not a sweep result (needs 'method' and 'metrics'), skipped", stacklevel=2)
            continue
        rows.append(row)
    return rows


def append_result(out_dir: str | Path, row: dict[str, Any]) -> None:
    """Append one row durably: one ``write`` of the whole line on an O_APPEND descriptor, then fsync."""
    path = Path(out_dir) / RESULTS_FILE
    line = json.dumps(row, default=str) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(descriptor).st_size > 0:
            with path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":  # a torn last line: start ours on a fresh one
                    line = "\n" + line
        os.write(descriptor, line.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def row_setup(row: dict[str, Any]) -> dict[str, Any]:
    """A row's setup, with the fields added since it was written at the value they had then (``budget_unit``:
    ``"video"``), so older results files still resume and group with new rows."""
    setup = row.get("setup")
    if not isinstance(setup, dict):
        return setup
    return {**setup, "budget_unit": setup.get("budget_unit", "video")}


def _same_setup(row: dict[str, Any], setup: dict[str, Any]) -> bool:
    return row_setup(row) == json.loads(json.dumps(setup, default=str))


def finished_keys(spec: SweepSpec) -> set[str]:
    setup = spec.setup()
    return {
        point_key(setup, GridPoint(row["method"], _as_keep(row.get("keep"))))
        for row in read_results(spec.out_dir)
        if _same_setup(row, setup)
    }


def saved_points(spec: SweepSpec) -> int:
    """How many points of ``spec``'s grid its results file holds (what a rerun will skip)."""
    return len(finished_keys(spec))


# -- evaluation --------------------------------------------------------------------------------------------------


def _task_manager(include_path: str | None, tasks: list[str] | None = None) -> Any:
    """lmms-eval's task index over the local tasks, ``include_path`` and lmms-eval's own task folders; without the
    latter when every task asked for is local (indexing lmms-eval's hundreds of YAMLs takes seconds)."""
    from lmms_eval.tasks import TaskManager

    from vtprune.eval.tasks import LOCAL_TASKS, task_dir

    paths = [str(task_dir())] + ([include_path] if include_path else [])
    local_only = bool(tasks) and all(task in LOCAL_TASKS for task in tasks)
    return TaskManager(include_path=paths, include_defaults=not local_only)


def check_tasks(tasks: list[str], manager: Any) -> None:
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        local = sorted(name for name in known if name.startswith("vtprune"))
        raise ValueError(f"unknown lmms-eval task(s) {', '.join(unknown)}; local tasks: {', '.join(local)} "
                         "(other names need lmms-eval's task files and their data)")  # fmt: skip


def check_methods_apply(model: Any, spec: SweepSpec) -> None:
    """Wrap and unwrap every (method, keep) once: a method the model cannot take fails before any evaluation."""
    import vtprune

    for name in spec.methods:
        for keep in spec.keeps:
            vtprune.wrap(model, name, keep=keep, budget=spec.budget, budget_unit=spec.budget_unit,
                         **spec.options).unwrap()  # fmt: skip


def evaluate_point(
    model: Any,
    processor: Any,
    spec: SweepSpec,
    point: GridPoint,
    manager: Any,
    on_request: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate one grid point through lmms-eval's evaluator; the row that goes into results.jsonl.
    ``on_request(done, total)`` follows the point's requests (else the lmms-eval model draws its own bar)."""
    from lmms_eval.evaluator import simple_evaluate

    from vtprune.eval.lmms_model import VtpruneLMM

    options = spec.options if point.method != DENSE else {}
    keep = {"keep": point.keep} if point.method != DENSE else {}
    lm = VtpruneLMM(
        pretrained=spec.model, model=model, processor=processor, method=point.method, budget=spec.budget,
        budget_unit=spec.budget_unit, batch_size=spec.batch_size, on_progress=on_request, **keep, **options,
    )  # fmt: skip
    began = time.perf_counter()
    try:
        output = simple_evaluate(
            model=lm, tasks=list(spec.tasks), limit=spec.limit, task_manager=manager, log_samples=False,
            bootstrap_iters=0, verbosity="WARNING",
        )  # fmt: skip
    finally:
        lm.close()
    return {
        "setup": spec.setup(),
        "method": point.method,
        "keep": point.keep,
        "metrics": _metrics(output["results"]),
        "cost": lm.cost_summary(),
        "seconds": round(time.perf_counter() - began, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lmms-eval's ``{"accuracy,none": 0.8, "accuracy_stderr,none": ...}`` -> ``{"accuracy": 0.8}`` per task."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics[task] = {}
        for key, value in values.items():
            name = key.split(",")[0]
            if "stderr" in name or name == "alias" or isinstance(value, bool):
                continue
            try:
                metrics[task][name] = float(value)
            except (TypeError, ValueError):
                continue
    return metrics


def run_sweep(
    spec: SweepSpec,
    *,
    ray: bool = False,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_point: Callable[[GridPoint], None] | None = None,
    on_request: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the points of ``spec`` not already in its results file; returns the rows of this setup.

    ``on_start(total, pending)`` runs once before evaluating; ``on_row(row)`` after each finished point; in this
    process (not on Ray) also ``on_point(point)`` before each point and ``on_request(done, total)`` within it.
    """
    validate(spec)
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    done = finished_keys(spec)
    setup = spec.setup()
    pending = [point for point in spec.grid() if point_key(setup, point) not in done]
    manager = _task_manager(spec.include_path, spec.tasks)
    check_tasks(spec.tasks, manager)
    if on_start is not None:
        on_start(len(spec.grid()), len(pending))
    if pending:
        if ray or ray_address:
            _run_on_ray(spec, pending, ray_address, ray_workers, on_row)
        else:
            _run_here(spec, pending, manager, on_row, on_point, on_request)
    rows = [row for row in read_results(spec.out_dir) if _same_setup(row, setup)]
    return rows


def _load(spec: SweepSpec) -> tuple[Any, Any]:
    from vtprune.eval.inputs import load_model

    device = spec.device or _default_device()
    model, processor = load_model(spec.model, dtype=spec.dtype, device=device, text_processor=True)
    if processor is None:
        raise ValueError(f"model={spec.model!r} has no processor (tokenizer + image processor); lmms-eval needs one")
    check_methods_apply(model, spec)
    return model, processor


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_here(
    spec: SweepSpec,
    pending: list[GridPoint],
    manager: Any,
    on_row: Callable | None,
    on_point: Callable | None = None,
    on_request: Callable | None = None,
) -> None:
    model, processor = _load(spec)
    for point in pending:
        if on_point is not None:
            on_point(point)
        row = evaluate_point(model, processor, spec, point, manager, on_request)
        append_result(spec.out_dir, row)
        if on_row is not None:
            on_row(row)


class _Evaluator:
    """A Ray actor: one copy of the model, evaluating the grid points it is sent."""

    def __init__(self, spec_fields: dict[str, Any]) -> None:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one CPU per actor
        self.spec = SweepSpec(**spec_fields)
        self.model, self.processor = _load(self.spec)
        self.manager = _task_manager(self.spec.include_path, self.spec.tasks)

    def evaluate(self, method: str, keep: Any) -> dict[str, Any]:
        return evaluate_point(self.model, self.processor, self.spec, GridPoint(method, keep), self.manager)


def _run_on_ray(
    spec: SweepSpec, pending: list[GridPoint], address: str | None, workers: int | None, on_row: Callable | None
) -> None:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as error:
        raise ImportError("--ray needs Ray: pip install 'vtprune[ray]'") from error

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(2, workers or 2), include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or (gpus if gpus else 2)
    count = max(1, min(count, len(pending)))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    # fields travel as a dict: the actor rebuilds the spec, loads the model once and keeps it
    actor = ray.remote(**resources)(_Evaluator)
    fields = asdict(spec)
    fields["device"] = spec.device or ("cuda" if gpus else "cpu")  # where the actors run, not where the driver does
    pool = ActorPool([actor.remote(fields) for _ in range(count)])
    for row in pool.map_unordered(lambda a, p: a.evaluate.remote(p.method, p.keep), pending):
        append_result(spec.out_dir, row)
        if on_row is not None:
            on_row(row)
