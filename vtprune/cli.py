"""Command line: ``vtprune demo``, ``vtprune methods``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Prune the visual tokens of vision-language models.", no_args_is_help=True, add_completion=False)


def parse_keep(text: str) -> int | float:
    """'64' -> 64 (tokens), '0.25' -> 0.25 (fraction); anything else is a clear error."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise typer.BadParameter(f"keep must be an int >= 1 or a float in (0, 1], got {text!r}") from None


def _split(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


@app.command()
def demo(
    family: str = typer.Option(None, help="Comma-separated families (default: all four)."),
    methods: str = typer.Option(
        "random,uniform,fastv,vtc_cls,visionzip,transprune", help="Comma-separated registered methods."
    ),
    keep: str = typer.Option("16", help="Tokens kept per image (int) or a fraction in (0, 1], e.g. 0.25."),
) -> None:
    """Wrap tiny models of every family, generate, and print what each method kept."""
    from vtprune.core.budget import validate_keep
    from vtprune.demo import run_demo
    from vtprune.testing import FAMILIES

    families = _split(family)
    unknown = sorted(set(families or []) - set(FAMILIES))
    if unknown:
        raise typer.BadParameter(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    try:
        budget = validate_keep(parse_keep(keep))
        run_demo(families, _split(methods), budget)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error


@app.command("methods")
def list_methods_command() -> None:
    """List the registered pruning methods."""
    import vtprune

    table = Table(title="vtprune methods")
    for column in ("name", "summary", "paper", "defaults"):
        table.add_column(column)
    for name in vtprune.list_methods():
        config = vtprune.method_class(name)()
        defaults = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "method")
        table.add_row(name, config.summary, config.paper, defaults)
    Console().print(table)


if __name__ == "__main__":
    app()
