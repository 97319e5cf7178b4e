"""`--storage s3://` against a real S3 server on 127.0.0.1 (moto's server mode, scripts/local_s3.py): a sweep whose
driver is killed, resumed from the bucket keeping its finished trials, an adapter exported and the experiment
analysed from the bucket; the credentials, taken only from the environment, appear in no result, log or error
message."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from local_s3 import start_s3  # noqa: E402

pytestmark = pytest.mark.slow
BUCKET = "sweeps"
ROOT = f"s3://{BUCKET}/tune-lfm"
SPACE = ("fixed: {dataset: alpaca, max_steps: 30, num_examples: 320}\n"
         "sweep: {seed: {grid: [1, 2]}}\nresources: {max_concurrent: 1}\n")


@pytest.fixture(scope="module")
def s3():
    server, env = start_s3(BUCKET)
    ray_tmp = tempfile.mkdtemp(prefix="r")  # Ray's session logs, short enough for its socket paths
    yield {**os.environ, **env, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    server.stop()


def cli(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


def read_trials(env, uri):
    from tune_lfm.results import read_parquet

    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    try:
        return read_parquet(uri)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bucket_objects(env) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for obj in page.get("Contents", [])]
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def files_under(directory: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found[path] = Path(path).read_bytes()
    return found


def test_sweep_killed_resumed_and_analysed_on_s3_never_leaks_credentials(s3, tmp_path):
    space = tmp_path / "seeds.yaml"
    space.write_text(SPACE)
    trials_uri = f"{ROOT}/seeds/trials.parquet"
    outputs = []

    driver = subprocess.Popen([sys.executable, "-m", "tune_lfm.search", str(space), "--storage", ROOT, "--name",
                               "seeds", "--scale", "tiny"], env=s3, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        before = read_trials(s3, trials_uri)
        if before is not None and len(before) >= 1:
            break
        time.sleep(1)
    assert driver.poll() is None, "the sweep ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started, as if the machine died
    outputs.append(driver.communicate()[0].decode(errors="replace"))
    before = read_trials(s3, trials_uri).set_index("trial_id")
    assert len(before) == 1, before[["status"]]

    resumed = cli(s3, "tune_lfm.search", space, "--storage", ROOT, "--resume", "--scale", "tiny")  # found by name
    outputs.append(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {ROOT}/seeds: {len(before)} finished trials are kept" in resumed.stderr
    after = read_trials(s3, trials_uri).set_index("trial_id")
    assert len(after) == 2 and after.index.is_unique and set(after["status"]) == {"completed"}
    for trial_id, row in before.iterrows():  # finished trials were kept, not run again
        assert after.loc[trial_id, "finished_at"] == row["finished_at"]
    history = read_trials(s3, f"{ROOT}/seeds/history.parquet")
    assert history["trial_id"].nunique() == 2 and not history.duplicated(["trial_id", "step"]).any()

    # every trial's adapter is a checkpoint in the bucket, and exports from there to a model PEFT loads
    assert all(str(uri).startswith(f"{ROOT}/seeds/") for uri in after["adapter_uri"]), after["adapter_uri"]
    trial_id = after.index[0]
    exported = cli(s3, "tune_lfm.export", f"{ROOT}/seeds", "--trial", trial_id, "--out", tmp_path / "adapter")
    outputs.append(exported.stdout + exported.stderr)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").peft_config["default"].r == 8

    report = tmp_path / "analysis"
    analysis = cli(s3, "tune_lfm.analysis", f"{ROOT}/seeds", "--out", report)
    outputs.append(analysis.stdout + analysis.stderr)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert (report / "report.md").is_file() and (report / "pareto.parquet").is_file(), analysis.stdout[-2000:]

    missing = cli(s3, "tune_lfm.search", space, "--storage", "s3://no-such-bucket/x", "--scale", "tiny")
    outputs.append(missing.stdout + missing.stderr)
    assert missing.returncode == 2 and "no-such-bucket" in missing.stderr and "Traceback" not in missing.stderr

    stored = bucket_objects(s3)
    assert any(key.startswith("tune-lfm/seeds/") and "trial" in key for key in stored if key.count("/") > 2), \
        "Ray Tune kept no trial state in the bucket"
    written = {**stored, **files_under(s3["RAY_TMPDIR"]), **files_under(str(report)),
               **files_under(str(tmp_path / "adapter")),
               **{f"output {i}": text.encode() for i, text in enumerate(outputs)}}
    for secret in (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]):
        leaks = [where for where, content in written.items() if secret.encode() in content]
        assert not leaks, f"a credential was written to {leaks[:5]}"
