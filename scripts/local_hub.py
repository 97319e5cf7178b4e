"""A Hugging Face Hub on 127.0.0.1: olah (PyPI) in offline mirror mode serving local git repositories built here under
the study's real repo ids, to rehearse `--scale full` (hub streaming, `from_pretrained` by id) without the internet.

    python scripts/local_hub.py --dir /tmp/hub [--full-model]     # builds the repos, prints the environment, serves

Dataset repos hold the embedded rows of each study dataset in the layout and file format of the real repository
(parquet, jsonl, OpenHermes' JSON array on `main` plus its parquet conversion on `refs/convert/parquet`; splits and
configs as tune_lfm requests them; the last 20 rows form the eval split where the dataset has one). Model repos:
`tune-lfm/tiny-lfm2` (the embedded model, CPU-sized) and, with `--full-model`, `LiquidAI/LFM2.5-230M` (the shipped
config, random weights, tiny-lfm2's tokenizer: LFM2's special tokens and chat template, 4,096 of the config's 65,536
ids in use, so the embedding has the real model's size and only timings mean anything).

What olah 0.5's mirror mode does not answer as the hub does (README, "Datasets"):
- a ranged GET gets the whole file (200, not 206): pyarrow reads a parquet footer as the last 64 KiB, so a larger
  file reads as corrupt. Parquet is therefore written in shards of at most 60 KB, whose first read starts at byte 0.
- a revision containing `/`: `refs/convert/parquet` must be pinned by its commit (`user_datasets`).
- a file or folder the repository lacks, asked for at a branch name: 401 "repository not found" instead of 404, which
  transformers' tokenizer loading treats as fatal (at a commit it is 404). Models are therefore loaded pinned to a
  commit, `--model tune-lfm/tiny-lfm2@<commit>`, and model repos carry `additional_chat_templates/README.md`.
The commits printed at start are those pins.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

EVAL_ROWS = 20  # the embedded files' held-out tail (tune_lfm.data.loading.EMBEDDED_EVAL_ROWS)
TINY_MODEL_ID = "tune-lfm/tiny-lfm2"
FULL_MODEL_ID = "LiquidAI/LFM2.5-230M"
PARQUET_CONVERSION = "refs/convert/parquet"

# Per study dataset: file path in the repository -> which embedded rows it holds ("train": all but the held-out
# tail, "eval": the tail, "all": every row). Paths follow the real repositories; a parquet file is written as shards
# numbered in place of SHARD_PLACEHOLDER (CONVERSION_PLACEHOLDER in the parquet conversion's names).
SHARD_PLACEHOLDER = "NNNNN-of-NNNNN"
CONVERSION_PLACEHOLDER = "NNNN"
SHARD_BYTES = 60_000
DATASET_FILES = {
    "smol-magpie-ultra": {"data/smol-magpie-ultra/train-NNNNN-of-NNNNN.parquet": "train",
                          "data/smol-magpie-ultra/test-NNNNN-of-NNNNN.parquet": "eval"},
    "ultrachat": {"data/train_sft-NNNNN-of-NNNNN.parquet": "train", "data/test_sft-NNNNN-of-NNNNN.parquet": "eval"},
    "finetome": {"data/train-NNNNN-of-NNNNN.parquet": "all"},
    "magicoder": {"data-oss_instruct-decontaminated.jsonl": "all"},
    "tulu3": {"data/train-NNNNN-of-NNNNN.parquet": "all"},
    "openhermes": {"openhermes2_5.json": "all"},
    "slimorca": {"oo-labeled_correct.gpt4.sharegpt.jsonl": "all"},
    "gsm8k": {"main/train-NNNNN-of-NNNNN.parquet": "train", "main/test-NNNNN-of-NNNNN.parquet": "eval"},
    "dolly": {"databricks-dolly-15k.jsonl": "all"},
    "alpaca": {"data/train-NNNNN-of-NNNNN-a09b74b3ef9c3b56.parquet": "all"},
}
OPENHERMES_CONVERSION = {"default/train/NNNN.parquet": "all"}


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=tune_lfm", "-c", "user.email=tune_lfm@localhost", "-c", "init.defaultBranch=main",
               *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _parquet_shards(rows: list[dict]) -> list[bytes]:
    """The rows as the fewest parquet files of at most SHARD_BYTES each (see the module doc: olah ignores Range)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    for count in range(1, len(rows) + 1):
        size = -(-len(rows) // count)
        shards = []
        for start in range(0, len(rows), size):
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows[start:start + size]), buffer)
            shards.append(buffer.getvalue())
        if max(map(len, shards)) <= SHARD_BYTES:
            return shards
    raise ValueError(f"a single row is larger than {SHARD_BYTES} bytes as parquet")


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        shards = _parquet_shards(rows)
        for index, shard in enumerate(shards):
            name = path.name.replace(SHARD_PLACEHOLDER, f"{index:05d}-of-{len(shards):05d}")
            (path.parent / name.replace(CONVERSION_PLACEHOLDER, f"{index:04d}")).write_bytes(shard)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:  # one JSON array, as OpenHermes-2.5 ships
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def _readme(spec, files: dict[str, str]) -> str:
    """A dataset card whose `configs` declare the config and split names tune_lfm asks for (as the real cards do)."""
    split_of = {"train": spec.split, "eval": spec.eval_split, "all": spec.split}
    splits = "".join(f"  - split: {split_of[part]}\n    path: {path.replace(SHARD_PLACEHOLDER, '*')}\n"
                     for path, part in files.items())
    configs = f"configs:\n- config_name: {spec.hub_config or 'default'}\n  data_files:\n{splits}"
    return f"---\n{configs}---\n# {spec.hub_id}\n\ntune_lfm rehearsal copy: the embedded rows of '{spec.name}'.\n"


def _fill(repo: Path, spec, files: dict[str, str], rows: list[dict]) -> None:
    parts = {"train": rows[:-EVAL_ROWS], "eval": rows[-EVAL_ROWS:], "all": rows}
    for path, part in files.items():
        _write_rows(repo / path, parts[part])


def build_dataset_repo(mirrors: Path, name: str) -> dict[str, str]:
    """One study dataset as a git repository under `mirrors`; returns its revisions' commits."""
    from tune_lfm.data.loading import EMBEDDED_DIR
    from tune_lfm.data.registry import DATASETS

    spec = DATASETS[name]
    rows = [json.loads(line) for line in (EMBEDDED_DIR / spec.embedded).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    repo = mirrors / "datasets" / spec.hub_id
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    _git(repo, "init", "-q")
    files = DATASET_FILES[name]
    _fill(repo, spec, files, rows)
    (repo / "README.md").write_text(_readme(spec, files) if spec.revision is None else f"# {spec.hub_id}\n")
    commits = {"main": _commit(repo, "rows")}
    if spec.revision == PARQUET_CONVERSION:  # the hub's parquet conversion: an orphan history under refs/convert/
        _git(repo, "checkout", "-q", "--orphan", "parquet-conversion")
        _git(repo, "rm", "-rfq", ".")
        _fill(repo, spec, OPENHERMES_CONVERSION, rows)
        commits[PARQUET_CONVERSION] = _commit(repo, "parquet conversion")
        _git(repo, "update-ref", PARQUET_CONVERSION, "HEAD")
        _git(repo, "checkout", "-q", "main")
        _git(repo, "branch", "-D", "parquet-conversion")
    return commits


def build_model_repo(mirrors: Path, hub_id: str, files_from: Path) -> str:
    """A model repository holding the files of `files_from`; returns its commit.

    `additional_chat_templates/` holds only a README: transformers lists that folder, and olah answers the listing
    of a missing folder with 401 (see the module doc).
    """
    repo = mirrors / "models" / hub_id
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(files_from, repo)
    templates = repo / "additional_chat_templates"
    templates.mkdir(exist_ok=True)
    (templates / "README.md").write_text("Extra chat templates of this model (*.jinja); none.\n")
    _git(repo, "init", "-q")
    return _commit(repo, "model")


def build_repos(mirrors: Path, full_model: bool = False) -> dict[str, dict[str, str]]:
    """Every study dataset and the model repos; returns {repo id: {revision: commit}}."""
    from tune_lfm.data.registry import DATASETS
    from tune_lfm.models import EMBEDDED_DIR

    commits = {DATASETS[name].hub_id: build_dataset_repo(mirrors, name) for name in DATASET_FILES}
    commits[TINY_MODEL_ID] = {"main": build_model_repo(mirrors, TINY_MODEL_ID, EMBEDDED_DIR)}
    if full_model:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
        from offline_model import save_random_model

        staging = mirrors.parent / "full-model-files"
        shutil.rmtree(staging, ignore_errors=True)
        save_random_model(FULL_MODEL_ID, staging)
        commits[FULL_MODEL_ID] = {"main": build_model_repo(mirrors, FULL_MODEL_ID, staging)}
        shutil.rmtree(staging)
    return commits


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_hub(workdir: Path, mirrors: Path, timeout_s: float = 60) -> tuple[subprocess.Popen, str, Path]:
    """Start olah on a free port serving `mirrors`; return the process, the endpoint and its request log."""
    port = _free_port()
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{workdir / "olah-cache"}"\n'
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        f'mirrors-path = ["{mirrors}"]\n\n[accessibility]\noffline = true\n')
    log = workdir / "olah.log"
    olah = shutil.which("olah-cli") or str(Path(sys.executable).with_name("olah-cli"))
    server = subprocess.Popen([olah, "-c", str(config), "--log-path", str(workdir / "olah-logs")], cwd=workdir,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"olah exited with code {server.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=2)
            return server, endpoint, log
        except urllib.error.HTTPError:  # any answer means it is up (offline, it has no one to ask who we are)
            return server, endpoint, log
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"olah did not answer on {endpoint} within {timeout_s:.0f} s; see {log}")


REQUEST_LINE = re.compile(r'"(GET|HEAD|POST) (\S+) HTTP/[\d.]+" (\d{3})')


def requests_in(log: Path) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request the server has logged so far."""
    return [(m[1], m[2], int(m[3])) for m in REQUEST_LINE.finditer(log.read_text(errors="replace"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="work directory: repositories, server config, logs")
    parser.add_argument("--full-model", action="store_true",
                        help=f"also build {FULL_MODEL_ID} (random weights, ~0.5 GB, a minute or two)")
    args = parser.parse_args()
    workdir = args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    commits = build_repos(workdir / "mirrors", args.full_model)
    server, endpoint, log = start_hub(workdir, workdir / "mirrors")
    print(f"export HF_ENDPOINT={endpoint}\nunset HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE")
    for repo_id, revisions in commits.items():
        print(f"# {repo_id}: " + ", ".join(f"{rev} = {sha}" for rev, sha in revisions.items()))
    print(f"# requests are logged to {log}; Ctrl-C stops the server", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.terminate()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
