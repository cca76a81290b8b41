"""`reembed plan` and `reembed evaluate`: before a migration, its cost and its gain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cli.common import (
    emit,
    fail,
    json_option,
    run_guarded,
    stack,
)
from reembed.errors import InputError, ReembedError
from reembed.settings import Settings


@click.command()
@click.argument("alias")
@click.option("--to", "to_model", required=True, help="The new model (name or directory).")
@click.option("--workers", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Worker processes (GPUs) the estimate assumes.")
@click.option("--sample", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Documents embedded to measure throughput.")
@click.option("--queries-per-month", type=click.FloatRange(0), default=None)
@click.option("--value-per-query", type=click.FloatRange(0), default=None, help="What one query is worth.")
@click.option("--engineering-cost", type=click.FloatRange(0), default=None, help="One-off cost of the change.")
@click.option("--quality-gain", type=float, default=None,
              help="Relative gain from `reembed evaluate` (0.017 = +1.7 %), for the return on investment.")
@json_option
@click.pass_obj
def plan(settings: Settings, alias: str, to_model: str, workers: int, sample: int, queries_per_month: float | None,
         value_per_query: float | None, engineering_cost: float | None, quality_gain: float | None,
         as_json: bool) -> None:
    """Before migrating: documents, tokens, truncation, measured throughput, time, storage, cost, ROI."""
    def run() -> None:
        from producer.plan import plan as make_plan

        with stack(settings, 0) as local:
            result = make_plan(local.settings, alias, to_model, workers, sample, queries_per_month,
                               value_per_query, engineering_cost, quality_gain)
        emit(as_json, result)
        for warning in result["warnings"]:
            click.echo(f"reembed: warning: {warning}", err=True)
    run_guarded(run)


@click.command()
@click.argument("alias")
@click.option("--to", "to_model", required=True, help="The new model (name or directory).")
@click.option("--queries", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="BEIR queries.jsonl (with --qrels); without them, queries are made from the corpus.")
@click.option("--qrels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="BEIR qrels TSV (query-id, corpus-id, score; graded relevance allowed).")
@click.option("--sample", type=click.IntRange(1), default=None, help="Documents to evaluate on (judged ones always in).")
@click.option("--k", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--min-gain", type=float, default=0.01, show_default=True, help="Gain needed for GO.")
@click.option("--tolerance", type=float, default=0.01, show_default=True, help="Loss that means NO-GO.")
@click.option("--compare", type=click.Choice(["semantic", "hybrid"]), default="semantic", show_default=True)
@click.option("--synthetic", type=click.IntRange(10, 100_000), default=200, show_default=True,
              help="Queries to make from the corpus when no files are given.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.md, report.json and metrics.png here.")
@click.option("--here", is_flag=True,
              help="Embed the sample in this process instead of on the workers (their GPUs when they have them).")
@click.option("--apply-fusion", is_flag=True,
              help="Make ALIAS's hybrid search use the fusion the judged queries chose for each model.")
@json_option
@click.pass_obj
def evaluate(settings: Settings, alias: str, to_model: str, queries: Path | None, qrels: Path | None,
             sample: int | None, k: int, min_gain: float, tolerance: float, compare: str, synthetic: int,
             report_dir: Path | None, here: bool, apply_fusion: bool, as_json: bool) -> None:
    """Score old model, new model, BM25 and hybrid on ALIAS; exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE."""
    from producer.evaluate import Evaluator, write_report
    from reembed.evaluation import VERDICT_EXIT

    outcome: dict[str, Any] = {}

    def run() -> None:
        with stack(settings, None if not here else 0) as local:
            report = Evaluator(local.settings, on_workers=not here).run(
                alias, to_model, queries, qrels, sample, k, min_gain, tolerance, synthetic, compare,
                apply_fusion=apply_fusion)
        if report_dir is not None:
            report["files"] = [str(p) for p in write_report(report, report_dir)]
        d = report["difference"]
        rows = [f"{name:<11} " + "  ".join(f"{m} {v:.4f}" for m, v in values.items())
                for name, values in report["metrics"].items()]
        fusion = [f"fusion {side}: serves {row['served']}; "
                  + (f"judged queries choose {row['recommended_fusion']} ({report['metric']} {row['cross_validated']:.4f} "
                     f"cross-validated{', applied' if apply_fusion else ''})" if row["recommended"] else row["why_not"])
                  for side, row in report["fusion"].items()]
        emit(as_json, report, "\n".join([*rows, f"{report['compare']} {report['metric']}: {d['mean']:+.4f} "
                                           f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] -> {report['verdict']} "
                                           f"({report['queries']} {report['queries_kind']})", *fusion]))
        outcome["verdict"] = report["verdict"]

    try:
        run()
    except ReembedError as exc:
        fail(str(exc), 2)  # an error is 2 here: 1 and 3 are verdicts
    sys.exit(VERDICT_EXIT[outcome["verdict"]])


@click.command()
@click.argument("alias")
@click.option("--model", default=None, help="The model whose fusion to set (default: the live collection's).")
@click.option("--set", "chosen", default=None, metavar="FUSION",
              help="convex[:W] or rrf[:W[:K]], W = the semantic ranking's share (0: BM25 only, 1: semantic only).")
@click.option("--reset", is_flag=True, help="Forget the model's fusion: the default (REEMBED_FUSION) applies again.")
@json_option
@click.pass_obj
def fusion(settings: Settings, alias: str, model: str | None, chosen: str | None, reset: bool, as_json: bool) -> None:
    """Show or set how `hybrid` fuses BM25 with each model's ranking on ALIAS.

    `reembed evaluate --queries Q --qrels R --apply-fusion` sets it from judged queries; this sets it by hand.
    """
    from producer import ControlPlane
    from reembed.fusion import parse_fusion

    def run() -> None:
        if chosen is not None and reset:
            raise InputError("give --set or --reset, not both")
        with stack(settings, 0) as local:
            control = ControlPlane(local.settings)
            if chosen is not None or reset:
                spec = parse_fusion(chosen, settings.rrf_k, "--set") if chosen is not None else None
                result = control.set_fusion(alias, model, spec)
            else:
                result = control.fusions(alias)
        lines = [f"{r['model']}: {r['fusion']} ({'set on the alias' if r['carried_by_alias'] else 'default'}"
                 f"{': ' + r['tuned_on'] if r['tuned_on'] else ''})" for r in result["fusion"]]
        emit(as_json, result, "\n".join(lines))
    run_guarded(run)
