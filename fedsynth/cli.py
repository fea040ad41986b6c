"""The ``fedsynth`` command: the composition root that wires the parts together.

Errors a user can fix (bad spec, bad table, bad model file, bad option) are printed as
one clear message and exit with status 2; nothing is written in that case.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="fedsynth: differentially private synthetic data from tables that cannot be shared.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def _parse_conditions(items: list[str]) -> dict[str, str]:
    conditions: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _fail(f"--condition {item!r}: expected COLUMN=VALUE")
        conditions[name.strip()] = value.strip()
    return conditions


@app.command()
def train(
    spec: Annotated[Path, typer.Option(help="Federation spec (TOML), e.g. federations/bank.toml")],
    data: Annotated[Path, typer.Option(help="Training table, CSV or Parquet")],
    out: Annotated[Path, typer.Option(help="Directory to write the model artifact to")],
    epsilon: Annotated[
        float | None, typer.Option(help="Override privacy.target_epsilon (inf: no DP)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override training.seed")] = None,
) -> None:
    """Train the spec's GAN or VAE on one local table with DP-SGD (no federation)."""
    from fedsynth.generative.spec import SpecError, load_spec, parse_spec
    from fedsynth.generative.table import TableError, read_table, validate_table
    from fedsynth.generative.training import TrainingError
    from fedsynth.generative.training import train as train_model

    try:
        loaded = load_spec(spec)
        if epsilon is not None or seed is not None:
            raw = loaded.model_dump(mode="python")
            if epsilon is not None:
                raw["privacy"]["target_epsilon"] = epsilon
            if seed is not None:
                raw["training"]["seed"] = seed
            loaded = parse_spec(raw, source=f"{spec.name} (with overrides)")
        frame = validate_table(read_table(data), loaded.schema)
    except (SpecError, TableError) as exc:
        raise _fail(str(exc)) from None

    console.print(
        f"training [bold]{loaded.model.kind}[/] on {len(frame):,} rows of {data.name}, "
        f"target epsilon {loaded.privacy.target_epsilon:g} at delta {loaded.privacy.delta:g}"
    )
    bar = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[losses]}"),
        TextColumn("epsilon {task.fields[eps]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task("train", total=None, epoch="-", losses="", eps="-")

        def report(p) -> None:
            losses = " ".join(f"{k} {v:.3f}" for k, v in p.losses.items())
            eps = "inf" if math.isinf(p.epsilon) else f"{p.epsilon:.3f}"
            bar.update(
                task,
                completed=p.step,
                total=p.steps,
                epoch=f"{p.epoch}/{p.epochs}",
                losses=losses,
                eps=eps,
            )

        try:
            model = train_model(frame, loaded, progress=report)
        except TrainingError as exc:
            raise _fail(str(exc)) from None
    model.save(out)
    privacy = model.metadata["privacy"]
    console.print(
        f"saved {out} (epsilon {privacy['epsilon']}, noise multiplier "
        f"{privacy['noise_multiplier']:.3f}, {privacy['steps']} steps, "
        f"{model.metadata['training']['fit_seconds']:.1f} s)"
    )


@app.command()
def sample(
    model: Annotated[Path, typer.Option(help="Model directory written by `fedsynth train`")],
    n: Annotated[int, typer.Option("-n", "--rows", min=0, help="Number of rows")],
    out: Annotated[Path, typer.Option(help="Output file: .csv, .parquet or .ndjson")],
    seed: Annotated[int, typer.Option(help="Same seed, same rows")] = 0,
    condition: Annotated[
        list[str], typer.Option(help="COLUMN=VALUE on a categorical column (repeatable)")
    ] = [],  # noqa: B006 - typer needs a literal default
) -> None:
    """Generate synthetic rows, streamed to a file with constant memory."""
    from fedsynth.generative.export import format_for_path, write_file
    from fedsynth.generative.model import ModelFileError, SynthModel

    conditions = _parse_conditions(condition)
    try:
        format_for_path(out)
        loaded = SynthModel.load(model)
        loaded.codec.condition_vector(conditions, 0)  # validate before writing
    except (ModelFileError, ValueError) as exc:
        raise _fail(str(exc)) from None
    started = time.perf_counter()
    provenance = {
        "synthetic": "true",
        "model": str(model),
        "epsilon": str(loaded.metadata["privacy"]["epsilon"]),
        "delta": str(loaded.metadata["privacy"]["delta"]),
    }
    size = write_file(loaded.iter_samples(n, seed, conditions), loaded.schema, out, provenance)
    elapsed = time.perf_counter() - started
    console.print(
        f"wrote {n:,} synthetic rows to {out} ({size / 1e6:.1f} MB, "
        f"{n / max(elapsed, 1e-9):,.0f} rows/s)"
    )


@app.command()
def report(
    model: Annotated[Path, typer.Option(help="Model directory")],
    real: Annotated[Path, typer.Option(help="The real rows the model was trained on")],
    holdout: Annotated[
        Path | None, typer.Option(help="Real rows NOT used in training (for TSTR and DCR)")
    ] = None,
    rows: Annotated[
        int | None, typer.Option(help="Synthetic rows (default: as many as real)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Quality report: fidelity (column shapes, pair trends), utility (TSTR), privacy (DCR)."""
    from fedsynth.generative import quality
    from fedsynth.generative.model import ModelFileError, SynthModel
    from fedsynth.generative.table import TableError, read_table, validate_table

    try:
        loaded = SynthModel.load(model)
        train_rows = validate_table(read_table(real), loaded.schema)
        held = validate_table(read_table(holdout), loaded.schema) if holdout else None
    except (ModelFileError, TableError) as exc:
        raise _fail(str(exc)) from None
    synthetic = loaded.sample(rows or len(train_rows), seed=seed)
    scores = quality.quality_report(train_rows, synthetic, loaded.schema)
    result: dict[str, object] = {
        "model": str(model),
        "epsilon": loaded.metadata["privacy"]["epsilon"],
        "delta": loaded.metadata["privacy"]["delta"],
        "quality": scores.quality,
        "column_shapes": scores.column_shapes,
        "column_pair_trends": scores.column_pair_trends,
    }
    if held is not None:
        result.update(quality.evaluate(train_rows, held, synthetic, loaded.schema, seed=seed))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=f"quality report: {model}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if held is None:
        console.print("give --holdout to add TSTR utility and distance to closest record (DCR)")


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option(help="A short run (about a minute) of the same path")
    ] = False,
) -> None:
    """Prepare the real demo tables, train a DP model per sector, print a summary."""
    from fedsynth.demo.data import DemoDataError
    from fedsynth.demo.run import fedsynth_home, run_demo

    home = fedsynth_home()
    console.print(f"FEDSYNTH_HOME = {home}")
    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("epsilon {task.fields[eps]}"),
        TimeElapsedColumn(),
        console=console,
    )
    tasks: dict[str, TaskID] = {}

    def report(sector: str, p) -> None:
        if sector not in tasks:
            tasks[sector] = bar.add_task(sector, total=p.steps, eps="-")
        eps = "inf" if math.isinf(p.epsilon) else f"{p.epsilon:.3f}"
        bar.update(tasks[sector], completed=p.step, eps=eps)

    try:
        with bar:
            results = run_demo(home, quick=quick, on_progress=report)
    except (DemoDataError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title="fedsynth demo: one DP model per sector (trained centrally for now)")
    for name in ("sector", "model", "rows", "epsilon", "quality", "TSTR AUC", "TRTR AUC", "fit s"):
        table.add_column(name, justify="left" if name in ("sector", "model") else "right")

    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    for r in results:
        table.add_row(
            r.sector,
            r.kind,
            f"{r.rows:,}",
            fmt(r.epsilon),
            fmt(r.quality),
            fmt(r.tstr_auc),
            fmt(r.trtr_auc),
            f"{r.fit_seconds:.0f}",
        )
    Console().print(table)
    console.print(
        f"models saved under {home / 'models'}; try: fedsynth sample --model "
        f"{home / 'models' / 'bank'} -n 1000 --out bank_synthetic.csv"
    )


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
