"""`python -m tune_lfm.export EXPERIMENT (--preset NAME | --trial ID) --out DIR [--merge]`: a sweep's answer as a model.

EXPERIMENT is an experiment directory or its URI (s3://, gs://, file://). `--preset` picks the trial by the analysis's
rule (`tune_lfm.analysis.presets`: best_quality, best_efficiency, most_surgical); `--trial` names it. The trial's
adapter checkpoint (see `tune_lfm.checkpoints`) is copied from the experiment's storage into DIR with the base model's
tokenizer (so its chat template); `--merge` writes instead the base model with the adapter merged in, loadable by
`AutoModelForCausalLM.from_pretrained(DIR)` without PEFT. Either way DIR gets a README.md model card: the trial's
config, its metrics, and how it was chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .checkpoints import TRIAL_FILE, relative_adapter_path
from .config import ConfigError
from .teardown import skip_collection_at_exit

PRESETS = ("best_quality", "best_efficiency", "most_surgical")
CARD_METRICS = ("train_loss", "eval_loss", "base_loss", "kl", "kl_p95", "trainable_params", "hub_preserved",
                "hub_rank_corr", "steps_completed", "tokens_trained", "tokens_per_s", "wall_s", "peak_mem_gb")


class ExportError(ValueError):
    """The export cannot be made; the message names the experiment, trial or preset and what to do."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def choose_trial(source: str, preset: str | None, trial_id: str | None) -> tuple[dict[str, Any], str]:
    """The chosen trial's row and why it was chosen (the preset's rule and reason, or "named on the command line")."""
    from .analysis.load import load_trials
    from .analysis.pipeline import analyse

    if preset:
        chosen = next(p for p in analyse([source]).presets if p.name == preset)
        if chosen.trial is None:
            raise ExportError(f"{source}: no trial qualifies for preset {preset}: {chosen.reason}")
        return chosen.trial.to_dict(), f"preset **{preset}**: {chosen.rule}. {chosen.reason}."
    trials = load_trials([source]).trials
    rows = trials[trials["trial_id"] == trial_id]
    if rows.empty:
        raise ExportError(f"{source}: no trial {trial_id!r}; trials: {', '.join(sorted(trials['trial_id']))}")
    return rows.iloc[0].to_dict(), "named on the command line (`--trial`)"


def fetch_adapter(trial: dict[str, Any], source: str, into: Path) -> dict[str, Any]:
    """Copy the trial's adapter checkpoint from storage into `into`; return what TRIAL_FILE says about it."""
    import pyarrow.fs as pafs

    from .results import filesystem

    uri = trial.get("adapter_uri")
    if _missing(uri):
        raise ExportError(f"{source}: trial {trial['trial_id']} has no adapter on storage (its sweep kept "
                          "none, pruned it with keep_adapters: pareto, or predates adapter checkpoints)")
    # where the sweep saved it, else at the same place within the experiment given (moved, or copied from a bucket)
    for candidate in (uri, f"{source.rstrip('/')}/{relative_adapter_path(uri)}"):
        fs, path = filesystem(candidate)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            break
    else:
        raise ExportError(f"{source}: trial {trial['trial_id']}'s adapter is gone: not at {uri} nor within {source}")
    into.mkdir(parents=True)
    try:
        pafs.copy_files(path, str(into), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:
        raise ExportError(f"{source}: cannot copy trial {trial['trial_id']}'s adapter from {uri}: {err}") from None
    return json.loads((into / TRIAL_FILE).read_text())


def merge_into(adapter_dir: Path, described: dict[str, Any], out: Path, log) -> None:
    """The base model (in the precision the trial trained in) with the adapter merged in, saved to `out`."""
    import torch
    from peft import PeftModel

    from .atlas.store import weights_identity
    from .models import load_model, resolve_model

    ref = resolve_model(described["base_model"])
    revision = weights_identity(ref)
    if described.get("base_model_revision") and revision != described["base_model_revision"]:
        log(f"warning: {ref.name} here is {revision}, the adapter was trained on {described['base_model_revision']}")
    dtype = torch.bfloat16 if described["metrics"].get("precision_used") == "bf16" else torch.float32
    model = PeftModel.from_pretrained(load_model(ref, dtype, "cpu"), str(adapter_dir))
    model.merge_and_unload().save_pretrained(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def model_card(described: dict[str, Any], why: str, source: str, merged: bool) -> str:
    """README.md: front matter for the hub, then what the model is, how it was chosen, its config and metrics."""
    from .models import resolve_model

    base = described["base_model"]
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}", "tags: [lora, sft, tune_lfm]"]
    if resolve_model(base).kind == "hub":
        front.append(f"base_model: {base}")
    config, metrics = described["config"], described["metrics"]
    lines = front + ["---", "", f"# {base} + LoRA, trial {described['trial_id']}", "",
                     f"{'The merged model' if merged else 'A PEFT LoRA adapter'} from trial "
                     f"`{described['trial_id']}` of the tune_lfm sweep `{', '.join(described['sweeps'])}` "
                     f"(experiment `{source}`), status **{described['status']}**.", "",
                     f"Chosen by {why}", "",
                     f"Base model: `{base}` ({described.get('base_model_revision') or 'revision unknown'}).", ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(metrics[name])} |" for name in CARD_METRICS if not _missing(metrics.get(name))]
    lines += ["", "Definitions: the tune_lfm README, \"What a trial reports\".", "", "## Trial config", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in config.items() if value is not None]
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)"
            if merged else
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)")
    lines += ["", "## Use", "", "```python", load, "```", "",
              "Re-run the trial: `python -m tune_lfm.trial --config trial.yaml` with the config above.", ""]
    return "\n".join(lines)


def export(source: str, out: Path, preset: str | None = None, trial_id: str | None = None, merge: bool = False,
           log=print) -> Path:
    """Write the chosen trial's adapter (or merged model), tokenizer and model card to `out`."""
    from .models import load_tokenizer, resolve_model

    trial, why = choose_trial(source, preset, trial_id)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty; give a new directory")
    with tempfile.TemporaryDirectory(prefix="tune_lfm_export_") as scratch:
        adapter_dir = Path(scratch) / "adapter"
        described = fetch_adapter(trial, source, adapter_dir)
        out.mkdir(parents=True, exist_ok=True)
        if merge:
            merge_into(adapter_dir, described, out, log)
        else:
            shutil.copytree(adapter_dir, out, dirs_exist_ok=True)
            (out / "README.md").unlink(missing_ok=True)  # PEFT's empty template; ours follows
        shutil.copy(adapter_dir / TRIAL_FILE, out / TRIAL_FILE)
    load_tokenizer(resolve_model(described["base_model"])).save_pretrained(out)
    (out / "README.md").write_text(model_card(described, why, source, merge))
    log(f"exported trial {described['trial_id']} ({preset or 'named'}) -> {out}{' (merged)' if merge else ''}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune_lfm.export",
                                     description="Write a sweep trial's LoRA adapter, or the merged model, with a "
                                                 "model card.")
    parser.add_argument("experiment", help="experiment directory or URI (s3://, gs://, file://) holding trials.parquet")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=PRESETS, help="the trial the analysis picks for this preset")
    which.add_argument("--trial", metavar="ID", help="a trial_id of trials.parquet")
    parser.add_argument("--out", type=Path, required=True, help="new directory to write")
    parser.add_argument("--merge", action="store_true",
                        help="merge the adapter into the base model: a plain transformers model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    skip_collection_at_exit()
    from .analysis.schema import AnalysisError
    from .models import ModelNotFoundError

    args = build_parser().parse_args(argv)
    try:
        export(args.experiment, args.out, args.preset, args.trial, args.merge,
               log=lambda line: print(f"[tune_lfm] {line}", file=sys.stderr))
    except (ExportError, AnalysisError, ConfigError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
