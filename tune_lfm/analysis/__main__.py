"""`python -m tune_lfm.analysis PATH... [--out DIR] [--reference CSV] [--objectives SPEC]...` (see the package doc)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..teardown import skip_collection_at_exit
from .pareto import DEFAULT_FRONTS, front_name, parse_objectives
from .pipeline import Settings, analyse, default_output, printable, write_outputs
from .presets import PresetRules
from .schema import AnalysisError


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tune_lfm.analysis",
        description="Pareto fronts, presets, study tables, plots and a report from saved trial dataframes.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="experiment directory (with trials.parquet), a trials .parquet or a .csv; a local path "
                             "or a URI (s3://, gs://, file://, hdfs://...); several combine")
    parser.add_argument("--out", type=Path,
                        help="output directory (default: beside the first PATH; for a URI, the local "
                             "./analysis-<its last path component>)")
    parser.add_argument("--reference", metavar="CSV",
                        help="published numbers to compare with (a path or URI), e.g. "
                             "analysis/reference/seed_tables.csv")
    parser.add_argument("--objectives", action="append", metavar="SPEC",
                        help="one Pareto front as COLUMN:min|max,... (repeat for several); default: "
                             + " and ".join(front_name(f) for f in DEFAULT_FRONTS))
    parser.add_argument("--efficiency-fraction", type=_fraction, default=PresetRules.efficiency_fraction,
                        help="best_efficiency: share of the sweep's best improvement a trial must reach "
                             "(default %(default)s)")
    parser.add_argument("--surgical-fraction", type=_fraction, default=PresetRules.surgical_fraction,
                        help="most_surgical: share of the sweep's best improvement a trial must reach "
                             "(default %(default)s)")
    parser.add_argument("--noise-z", type=_positive, default=PresetRules.z, metavar="Z",
                        help="two values a, b with standard errors sa, sb are tied when |a-b| <= Z*sqrt(sa^2+sb^2); "
                             "used by tables, fronts, presets and what-mattered (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the list of written files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    skip_collection_at_exit()
    args = build_parser().parse_args(argv)
    try:
        fronts = tuple(parse_objectives(s) for s in args.objectives) if args.objectives else DEFAULT_FRONTS
        settings = Settings(fronts=fronts, rules=PresetRules(args.efficiency_fraction, args.surgical_fraction,
                                                                   args.noise_z))
        analysis = analyse(args.paths, reference=args.reference, settings=settings)
        out = args.out or default_output(args.paths[0])
        files = write_outputs(analysis, out)
    except AnalysisError as err:
        print(f"tune_lfm.analysis: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(printable(analysis, out))
    print(f"Wrote {len(files)} files to {out}:")
    for path in files.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
