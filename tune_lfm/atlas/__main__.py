"""`python -m tune_lfm.atlas`: compute (or load) a model's hub atlas, optionally measure an adapter against it."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError
from ..teardown import skip_collection_at_exit
from .preservation import MIN_RANK_CORR, MIN_TOPK_JACCARD, compare, tuned_scores
from .ranking import DEFAULT_K, combine, parse_quota
from .scores import METHODS
from .store import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, Atlas, ensure_atlas


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune_lfm.atlas",
                                     description="Find a model's hub layers on the probe set (cached), and check "
                                                 "whether an adapter preserves them.")
    parser.add_argument("--model", required=True, help="hub id, local model directory, or tiny-lfm2")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="number of hub layers (default %(default)s)")
    parser.add_argument("--quota", help="hubs per layer type, e.g. conv=2,full_attention=2, or none "
                                        "(default: half conv, half attention for LFM2 models, none otherwise)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="probe tokens per conversation")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="probe conversations per pass")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda (bf16 where supported) if available, else cpu (float32)")
    parser.add_argument("--adapter", metavar="DIR", help="a saved PEFT adapter: also report its hub preservation")
    parser.add_argument("--min-rank-corr", type=float, default=MIN_RANK_CORR)
    parser.add_argument("--min-topk-jaccard", type=float, default=MIN_TOPK_JACCARD)
    parser.add_argument("--plot", metavar="FILE.png", help="draw the per-layer scores")
    parser.add_argument("--cache-dir", help="atlas cache (default $TUNE_LFM_CACHE/atlas or ~/.cache/tune_lfm/atlas)")
    parser.add_argument("--recompute", action="store_true", help="ignore a cached atlas and compute it again")
    parser.add_argument("--json", action="store_true", help="print the atlas (and preservation) as one JSON object")
    return parser


def _measure_adapter(args: argparse.Namespace, atlas_options: dict) -> tuple[Atlas, dict[str, list[float]]]:
    """Load base model + adapter once: the atlas (cached, adapter disabled) and the tuned scores come from it."""
    from peft import PeftModel

    from ..models import load_model, load_tokenizer, resolve_model
    from .store import default_dtype_and_device

    ref = resolve_model(args.model)
    dtype, device = default_dtype_and_device(args.device)
    tokenizer = load_tokenizer(ref)
    model = PeftModel.from_pretrained(load_model(ref, dtype, device), args.adapter).eval()
    atlas = ensure_atlas(args.model, model=model, tokenizer=tokenizer, **atlas_options)
    return atlas, tuned_scores(model, atlas, tokenizer)


def _table(atlas: Atlas, tuned: dict[str, list[float]] | None, tuned_combined: list[float] | None) -> str:
    header = f"{'layer':>5}  {'type':<16}" + "".join(f"{name:>11}" for name in (*METHODS, "combined")) + "  hub"
    if tuned is not None:
        header += "".join(f"{'tuned ' + name[:5]:>13}" for name in (*METHODS, "combined"))
    lines = [f"hub atlas of {atlas.model}  weights {atlas.weights[:23]}  probe {atlas.probe_version} "
             f"({atlas.scored_tokens} scored tokens, max_length {atlas.max_length})  {atlas.dtype} on {atlas.device}",
             header]
    for i, kind in enumerate(atlas.layer_types):
        row = f"{i:>5}  {kind:<16}" + "".join(f"{atlas.scores[m][i]:>11.4f}" for m in METHODS)
        row += f"{atlas.combined[i]:>11.3f}  {'*' if i in atlas.hubs else ' ':>3}"
        if tuned is not None:
            row += "".join(f"{tuned[m][i]:>13.4f}" for m in METHODS) + f"{tuned_combined[i]:>13.3f}"
        lines.append(row)
    quota = ", ".join(f"{kind}={n}" for kind, n in atlas.quota.items()) or "none"
    lines.append(f"hubs {atlas.hubs}  (k={atlas.k}, quota {quota}); probe loss {atlas.probe_loss:.4f} nats")
    lines.append("noise floor (even vs odd probe conversations): " + "; ".join(
        f"{name} max|diff| {v['max_abs_diff']:.4g} rho {v['spearman']:.3f}" for name, v in atlas.noise.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    skip_collection_at_exit()
    args = build_parser().parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731 - stdout is for the result
    try:
        options = {"k": args.k, "quota": parse_quota(args.quota) if args.quota is not None else None,
                   "max_length": args.max_length, "batch_size": args.batch_size, "device": args.device,
                   "cache_dir": args.cache_dir,
                   "recompute": args.recompute, "log": log}
        if args.model == "tiny-lfm2":
            log("[tune_lfm] atlas of the EMBEDDED model tiny-lfm2 — for tests and CPU runs, not real results")
        if args.adapter:
            atlas, tuned = _measure_adapter(args, options)
            summary = compare(atlas, tuned, args.min_rank_corr, args.min_topk_jaccard)
        else:
            atlas, tuned, summary = ensure_atlas(args.model, **options), None, None
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tuned_combined = combine(tuned) if tuned is not None else None
    if args.plot:
        from .plot import plot_atlas

        log(f"[tune_lfm] plot written to {plot_atlas(atlas, args.plot, tuned, tuned_combined)}")
    if args.json:
        payload = atlas.to_dict()
        if summary is not None:
            payload["preservation"] = {**summary, "tuned_scores": {**tuned, "combined": tuned_combined}}
        print(json.dumps(payload, indent=2))
    else:
        print(_table(atlas, tuned, tuned_combined))
        if summary is not None:
            print(f"preservation: rank corr {summary['hub_rank_corr']:.3f}, top-k jaccard "
                  f"{summary['hub_topk_jaccard']:.2f}, tuned hubs {summary['hub_layers_tuned']} -> "
                  f"{'preserved' if summary['hub_preserved'] else 'NOT preserved'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

