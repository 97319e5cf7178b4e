"""The cluster side: manifests that agree with the CLI, a real 3-node Ray cluster on this machine (a lost worker node
included), storage faults, and safety (no credentials leak, no code from YAML, no public dashboard).

The driver-killed/--resume drills run on local Ray and S3 (test_interrupts.py, test_s3_storage.py), the raising, NaN,
OOM and killed-worker drills in test_recovery.py; here the same guarantees (nothing lost, nothing duplicated, a trial
goes on from its checkpoint) are checked where only a cluster can break them.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray_results import resume_checkpoint_held

from tune_lfm.config import ConfigError
from tune_lfm.results import read_parquet, write_parquet_atomic
from tune_lfm.planning import with_hub_layers
from tune_lfm.search import build_parser
from tune_lfm.spaces import load_sweep, plan_trials

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "cluster"
DUMMY_KEY_ID = "AKIATUNELFMDUMMY7Q3Z"
DUMMY_SECRET = "tuneLfmDummySecret/never-leaks+5b1f0c9e"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
       "RAY_AUTH_MODE": "token", "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID, "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET}
TINY_TRIAL = "fixed: {dataset: alpaca, max_steps: 20, num_examples: 320}\nmax_failures: 1\n"  # 4 steps at tiny scale


def local_cluster_module():
    spec = importlib.util.spec_from_file_location("local_cluster", CLUSTER_DIR / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def search_args(command: str):
    """The real CLI parser applied to a `python -m tune_lfm.search ...` command line."""
    words = shlex.split(command)
    start = words.index("tune_lfm.search") + 1
    return build_parser().parse_args(words[start:])


# ---------------------------------------------------------------- manifests

def test_launcher_config_is_valid_for_ray_up_and_installs_the_project():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER_DIR / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema `ray up` checks configs against
    assert config["provider"]["type"] == "aws" and config["cluster_name"]
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [name for name, spec in node_types.items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(node_types[name]["max_workers"] >= 1 for name in gpu_types)
    assert node_types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(re.search(rf"pip install .*{re.escape(remote)}", cmd) for remote in mounted
               for cmd in config["setup_commands"]), "setup_commands must pip install the mounted checkout"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (an SSH tunnel) only


def _kuberay(kind: str) -> dict:
    [doc] = yaml_documents(CLUSTER_DIR / "kuberay" / f"{kind.lower()}.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    return doc


def _cluster_spec(kind: str) -> dict:
    doc = _kuberay(kind)
    return doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_has_a_gpu_worker_group_the_project_image_and_shared_storage(kind):
    spec = _cluster_spec(kind)
    claim = yaml_documents(CLUSTER_DIR / "kuberay" / "shared-storage.yaml")[0]
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups and all(g["maxReplicas"] >= g["replicas"] >= g["minReplicas"] for g in gpu_groups)
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    assert re.search(r"pip install .*-e", dockerfile) and spec["rayVersion"] in dockerfile
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claim["metadata"]["name"] in claims.values()
        container = pod["containers"][0]
        assert container["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        assert any(m["name"] in claims and m["mountPath"] == "/mnt/shared" for m in container["volumeMounts"])


def test_rayjob_entrypoint_is_a_valid_search_of_a_real_sweep_on_shared_storage():
    job = _kuberay("RayJob")["spec"]
    args = search_args(job["entrypoint"])
    sweep = load_sweep(args.space)  # names a shipped sweep that validates
    assert plan_trials(sweep, "tiny")
    assert args.storage.startswith("file:///mnt/shared/") and args.resume and args.name  # idempotent on retries
    assert job["shutdownAfterJobFinishes"] is True


def test_rayjob_creates_the_same_cluster_as_the_raycluster_manifest():
    assert _cluster_spec("RayJob") == _cluster_spec("RayCluster")


def test_every_search_command_in_the_cluster_readme_parses_and_uses_shared_storage():
    readme = (CLUSTER_DIR / "README.md").read_text()
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    commands = [line.split(" #")[0] for line in shell.splitlines() if "python -m tune_lfm.search" in line]
    assert len(commands) >= 4
    for command in commands:
        args = search_args(command)
        load_sweep(args.space)
        assert "://" in args.storage, command  # a cluster needs storage every node reaches


def test_no_credentials_in_cluster_files():
    key_id = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    literal_secret = re.compile(r"(?i)(secret|password|token|access_key)[\w-]*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}")
    for path in CLUSTER_DIR.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".md", ".py", "") and "__pycache__" not in path.parts:
            text = path.read_text()
            assert not key_id.search(text) and not literal_secret.search(text), path
    for path in (CLUSTER_DIR / "kuberay").glob("*.yaml"):
        for doc in yaml_documents(path):
            for env in _env_entries(doc):
                if re.search(r"(?i)secret|key|token|password", env["name"]):
                    assert "valueFrom" in env and "value" not in env, (path, env["name"])


def _env_entries(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env":
                yield from value
            else:
                yield from _env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_entries(item)


# ---------------------------------------------------------------- storage faults (no Ray)

def test_a_reader_always_sees_a_complete_trials_file_while_it_is_rewritten(tmp_path):
    """The supported mid-sweep readers get one whole version: results.read_parquet, or pandas on one open handle.

    (Readers that open the path twice, such as pd.read_parquet(path), polars and DuckDB, can pair the footer of one
    version with the pages of the next; cluster/README.md says to read with these two while a sweep runs.)
    """
    uri = str(tmp_path / "trials.parquet")
    write_parquet_atomic(pd.DataFrame({"n": [1], "payload": ["x"]}), uri)
    done, reads, failures = threading.Event(), [], []

    def writer():
        for i in range(300):
            rows = 1 + (i * 37) % 400
            write_parquet_atomic(pd.DataFrame({"n": [rows] * rows, "payload": [f"{i}-{j}" * 20 for j in range(rows)]}),
                                 uri)
        done.set()

    def via_handle():
        with open(uri, "rb") as handle:
            return pd.read_parquet(handle)

    def reader():
        while not done.is_set():
            for read in (read_parquet, via_handle):
                try:
                    frame = read(uri) if read is read_parquet else read()
                    if len(frame) != frame["n"].iloc[0]:
                        written = frame["n"].iloc[0]
                        failures.append(f"{read.__name__}: {len(frame)} rows in a file written with {written}")
                    reads.append(len(frame))
                except Exception as err:  # a torn or half-written file
                    failures.append(f"{read.__name__}: {err!r}")

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    assert len(reads) > 20 and len(set(reads)) > 5  # the reader really overlapped many rewrites
    assert not list(tmp_path.glob("*.tmp-*"))


WRITE_WITH_A_FILE_SIZE_LIMIT = """
import os, resource, signal, sys
from tune_lfm.results import ExperimentRecord, StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG, as on a full disk
record = ExperimentRecord(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
try:
    record.set_trial({"trial_id": "big", "status": "failed", "error": os.urandom(300_000).hex()})
except StorageError as err:
    print(f"StorageError: {err}")
    sys.exit(3)
"""


def test_storage_failing_mid_write_gives_a_clear_error_and_keeps_the_previous_dataframe(tmp_path):
    from tune_lfm.results import ExperimentRecord

    ExperimentRecord(str(tmp_path)).set_trial({"trial_id": "done", "status": "completed", "train_loss": 1.5})
    out = subprocess.run([sys.executable, "-c", WRITE_WITH_A_FILE_SIZE_LIMIT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "StorageError: cannot write" in out.stdout and "trials.parquet" in out.stdout
    trials = pd.read_parquet(tmp_path / "trials.parquet")
    assert list(trials["trial_id"]) == ["done"] and trials["train_loss"].iloc[0] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.parquet", "trials.parquet"]  # no partial file


def test_a_trial_row_is_stored_only_after_its_steps(tmp_path, monkeypatch):
    """The driver can die between the two files' writes (test_s3_storage kills it as soon as a row appears): a
    finished trial on storage must never lack its history, which a resume would keep as it is."""
    from tune_lfm import results

    record = results.ExperimentRecord(str(tmp_path))
    record.add_step("first", {"step": 1, "loss": 2.0})
    record.set_trial({"trial_id": "first", "status": "completed"})
    record.add_step("second", {"step": 1, "loss": 1.0})
    written = results.write_parquet_atomic

    def dies_after_one_write(frame, uri):
        written(frame, uri)
        raise KeyboardInterrupt  # stands for the SIGKILL that ends the driver before its second write

    monkeypatch.setattr(results, "write_parquet_atomic", dies_after_one_write)
    with pytest.raises(KeyboardInterrupt):
        record.set_trial({"trial_id": "second", "status": "completed"})
    stored, steps = pd.read_parquet(tmp_path / "trials.parquet"), pd.read_parquet(tmp_path / "history.parquet")
    assert set(stored["trial_id"]) <= set(steps["trial_id"]), (stored, steps)


# ---------------------------------------------------------------- safety (no Ray)

def test_sweep_yaml_cannot_run_code(tmp_path):
    marker = tmp_path / "executed"
    space = tmp_path / "evil.yaml"
    space.write_text(f"fixed: !!python/object/apply:os.system ['touch {marker}']\nsweep: {{seed: {{grid: [1]}}}}\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: not valid YAML.*python/object"):
        load_sweep(str(space))
    assert not marker.exists()


LISTENING = ("gcs_server", "raylet", "dashboard.py", "DashboardAgent")
"""Ray's processes that serve on a port (dashboard.py: its metrics server, which may open after `ray.init` returns)."""
LISTENERS = f"""
import json, os, time, psutil, ray
from tune_lfm.runner import connect_ray
connect_ray(None)
ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process too
me = psutil.Process()


def listeners():
    found = []
    for process in [me, *me.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline())[:120]
            sockets = process.net_connections(kind="inet") if hasattr(process, "net_connections") else \\
                process.connections(kind="inet")  # psutil < 6 (olah, in the test extra, pins 5.9)
            found += [[name, c.laddr.ip, c.laddr.port] for c in sockets if c.status == "LISTEN"]
        except psutil.Error:
            pass
    return found


def all_listening():
    names = " ".join(name for name, _, _ in listeners())
    return all(part in names for part in {LISTENING!r})


deadline = time.time() + 60  # on a busy machine the last of them may come up seconds later
while not all_listening() and time.time() < deadline:
    time.sleep(0.5)
print(json.dumps(listeners()))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only():
    """A local sweep's Ray (GCS, raylet, workers, agents, dashboard process) with ray[default] installed, as the
    cluster README tells users to: no server on any other interface."""
    import aiohttp  # noqa: F401  - ray[default] is installed: the dashboard runs in full, metrics exporter included
    import prometheus_client  # noqa: F401

    # The dashboard's metrics server binds one fixed port (44227) on every Ray; the Ray of a sweep in the other test
    # worker may hold it, and then this one's never listens. Its own port keeps the check about this Ray alone.
    env = {**ENV, "DASHBOARD_METRIC_PORT": str(local_cluster_module().free_port())}
    out = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    listeners = json.loads(out.stdout.strip().splitlines()[-1])
    names = " ".join(name for name, _, _ in listeners)
    assert all(part in names for part in LISTENING), names
    outside = [item for item in listeners if item[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not outside, outside


def test_local_cluster_dashboard_when_asked_for_listens_on_loopback_only():
    local_cluster = local_cluster_module()
    ports = {"gcs": 1, "dashboard": 2}
    head = local_cluster.node_command("head", "", 1, 0, Path("/tmp/x"), True, ports)
    assert "--include-dashboard=true" in head and "--dashboard-host=127.0.0.1" in head
    off = local_cluster.node_command("head", "", 1, 0, Path("/tmp/x"), False, ports)
    assert "--include-dashboard=false" in off


# ---------------------------------------------------------------- a 3-node Ray cluster on this machine

def run_search(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "tune_lfm.search", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, no GPU) + 2 workers (1 CPU, 1 logical GPU each) with the dashboard and job server, started by
    the shipped script; always stopped. The nodes see the dummy AWS credentials too, as cluster machines would see
    real ones.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="tlfm"))  # short: Ray's socket paths live under it
    script = [sys.executable, str(CLUSTER_DIR / "local_cluster.py"), "--state-dir", str(state_dir)]
    try:
        out = subprocess.run([*script, "start", "--workers", "2", "--dashboard"], capture_output=True, text=True,
                             timeout=300, env=ENV)
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
        state = json.loads(subprocess.run([*script, "status", "--json"], capture_output=True, text=True, check=True,
                                          env=ENV).stdout)
        assert [n["name"] for n in state["nodes"]] == ["head", "worker-1", "worker-2"]
        assert all(n["alive"] for n in state["nodes"]) and len({n["node_id"] for n in state["nodes"]}) == 3
        hints = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ")]
        yield {"script": script, "state": state, "state_dir": state_dir, "hints": hints}
    finally:
        subprocess.run([*script, "stop"], capture_output=True, timeout=120, env=ENV)
        shutil.rmtree(state_dir, ignore_errors=True)


def sweep_file(tmp_path: Path, seeds: list[int]) -> Path:
    path = tmp_path / "seeds.yaml"
    path.write_text(TINY_TRIAL + f"sweep: {{seed: {{grid: {seeds}}}}}\n")
    return path


def files_containing(paths: list[Path], *needles: str) -> list[str]:
    return [str(p) for p in paths if any(n.encode() in p.read_bytes() for n in needles)]


@pytest.mark.slow
def test_local_cluster_dashboard_and_job_server_listen_on_loopback_only(cluster):
    """With ray[default] (as the README says for `ray job submit`), the dashboard serves its web UI and job API on
    127.0.0.1 only. Its Prometheus metrics exporter (DASHBOARD_METRIC_PORT) follows the node address, as every
    node-to-node server of a multi-node Ray cluster does; it serves read-only metrics."""
    import aiohttp  # noqa: F401  - ray[default] is installed: the full dashboard runs
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    local_cluster = local_cluster_module()
    processes = [p for node in cluster["state"]["nodes"] for p in local_cluster.node_processes(node["pid"])]
    dashboards = [p for p in processes if any(arg.endswith("dashboard/dashboard.py") for arg in p.cmdline())]
    assert dashboards
    web_port = int(cluster["state"]["dashboard_url"].rsplit(":", 1)[1])
    listening = [c.laddr for p in dashboards for c in (p.net_connections(kind="inet") if hasattr(p, "net_connections")
                                                       else p.connections(kind="inet")) if c.status == "LISTEN"]
    assert web_port in {address.port for address in listening}
    for address in listening:
        if address.port != DASHBOARD_METRIC_PORT:
            assert address.ip in ("127.0.0.1", "::1"), address


def hint_command(hint: str) -> tuple[list[str], dict[str, str]]:
    """A printed `VAR=value ... command` line as argv and environment, run with this Python's executables."""
    words = shlex.split(hint)
    env = dict(ENV)
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    executables = {"python": sys.executable, "ray": str(Path(sys.executable).with_name("ray"))}
    return [executables.get(words[0], words[0]), *words[1:]], env


@pytest.mark.slow
def test_dry_run_on_a_cluster_plans_and_never_runs_a_trial(cluster):
    """The local cluster's own search hint, as printed, with --dry-run: it picks tiny scale, lists the trials, and
    starts none (nothing is written to its storage)."""
    [search] = [hint for hint in cluster["hints"] if "python -m tune_lfm.search" in hint and "job submit" not in hint]
    command, env = hint_command(search)
    args = search_args(search)
    out = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("4 trials") and "tiny-lfm2" in out.stdout
    assert "Trial status" not in out.stdout + out.stderr
    assert not Path(args.storage.removeprefix("file://")).exists()


@pytest.mark.slow
def test_the_printed_ray_job_submit_hint_runs_a_sweep_on_the_cluster(cluster):
    """`ray job submit --working-dir .` through the local cluster's dashboard, exactly as the script prints it (the
    cluster README's way of running a sweep): the job picks tiny scale and completes its trial."""
    [submit] = [hint for hint in cluster["hints"] if "ray job submit" in hint]
    command, env = hint_command(submit)
    # the sweep's own entrypoint ends the line; one optimizer makes its four trials one (4 tiny steps): what is
    # tested here is the job's way onto the cluster; spreading trials over it is the lost-node drill's
    command += ["--set", "max_steps=20", "--set", "optimizer=adamw"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "scale: TINY" in out.stdout + out.stderr
    storage = Path(search_args(submit.split(" -- ", 1)[1]).storage.removeprefix("file://"))
    [experiment] = [p for p in storage.iterdir() if p.name.startswith("optimizers-tiny-")]
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 1 and set(trials["status"]) == {"completed"} and (trials["scale"] == "tiny").all()
    assert (trials["max_steps"] == 4).all() and (trials["optimizer"] == "adamw").all()


@pytest.mark.slow
def test_local_storage_path_is_refused_on_a_multi_node_cluster(cluster, tmp_path):
    out = run_search(sweep_file(tmp_path, [1]), "--scale", "tiny", "--address", cluster["state"]["address"],
                     "--storage", tmp_path / "local")
    assert out.returncode == 2
    assert "is a local path, but the Ray cluster has 3 nodes" in out.stderr and "s3://" in out.stderr
    assert not (tmp_path / "local").exists()


@pytest.mark.slow
def test_unwritable_storage_fails_before_any_trial_with_a_clear_error(cluster, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = run_search(sweep_file(tmp_path, [1]), "--scale", "tiny", "--address", cluster["state"]["address"],
                     "--storage", f"file://{blocker}/sweeps", "--name", "never")
    assert out.returncode == 2
    assert re.search(rf"error: experiment storage file://{re.escape(str(blocker))}/sweeps/never is not writable",
                     out.stderr), out.stderr[-2000:]
    assert "Trial status" not in out.stderr + out.stdout and not list(tmp_path.rglob("*.parquet"))


RESUMABLE = """
fixed: {model: tiny-lfm2, data_source: embedded, dataset: alpaca, num_examples: 32, eval_examples: 4, max_length: 128,
        max_steps: 16, batch_size: 2, grad_accum: 1}
sweep: {seed: {grid: [3, 4]}}
resources: {cpus_per_trial: 1}
artifacts: {checkpoint_every_steps: 4}
max_failures: 1
"""


def trial_pids(local_cluster, node_pid: int) -> set[int]:
    """Process ids of the Tune trial actors (process title `ray::ImplicitFunc...`) among a node's processes."""
    pids = set()
    for process in local_cluster.node_processes(node_pid):
        try:
            if " ".join(process.cmdline()).startswith("ray::ImplicitFunc"):
                pids.add(process.pid)
        except Exception:  # the process ended while we looked
            continue
    return pids


@pytest.fixture(scope="module")
def lost_node(cluster, tmp_path_factory):
    """Two one-GPU trials submitted with --address onto shared storage: each worker has one logical GPU, so they
    run one on each worker. Once worker-2's trial has a resume checkpoint on the shared storage, worker-2 is
    SIGKILLed (raylet and all); the sweep must complete without it."""
    tmp = tmp_path_factory.mktemp("lost-node")
    local_cluster = local_cluster_module()
    victim = next(n for n in cluster["state"]["nodes"] if n["name"] == "worker-2")
    space = tmp / "resumable.yaml"
    space.write_text(RESUMABLE)
    experiment = tmp / "shared" / "lost-node"
    log = tmp / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-m", "tune_lfm.search", str(space), "--scale", "full", "--address",
                                   cluster["state"]["address"], "--storage", f"file://{tmp}/shared", "--name",
                                   "lost-node", "--gpus-per-trial", "1"], env=ENV, cwd=ROOT, stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not resume_checkpoint_held(experiment, trial_pids(local_cluster, victim["pid"])):
            assert time.time() < deadline and driver.poll() is None, "no trial checkpointed on worker-2"
            time.sleep(0.05)
        killed = subprocess.run([*cluster["script"], "kill", "worker-2"], capture_output=True, text=True, env=ENV)
        assert killed.returncode == 0, killed.stderr
        driver.wait(timeout=400)
    finally:
        driver.kill()
    assert driver.returncode == 0, log.read_text()[-3000:]
    assert not local_cluster.node_processes(victim["pid"])
    return {"output": log.read_text(), "dir": experiment, "victim": victim,
            "plan": {t.trial_id for t in with_hub_layers(plan_trials(load_sweep(str(space)), "full"))},
            "trials": pd.read_parquet(experiment / "trials.parquet"),
            "history": pd.read_parquet(experiment / "history.parquet")}


@pytest.mark.slow
def test_trials_spread_over_worker_nodes_and_land_in_shared_storage(cluster, lost_node):
    """One trial ran on each worker (worker-2's was seen there before the node was lost), none on the GPU-less head,
    and every trial's row and steps are on the shared storage."""
    trials = lost_node["trials"]
    assert trials["trial_id"].is_unique and set(trials["trial_id"]) == lost_node["plan"]  # nothing lost or doubled
    assert set(trials["status"]) == {"completed"}
    [stayed] = [row for _, row in trials.iterrows() if row["attempts"] == 1]
    [worker_1] = [n["node_id"] for n in cluster["state"]["nodes"] if n["name"] == "worker-1"]
    assert stayed["node_id"] == worker_1
    assert set(lost_node["history"]["trial_id"]) == lost_node["plan"]


@pytest.mark.slow
def test_credentials_in_the_environment_reach_no_result_or_output(lost_node):
    assert DUMMY_KEY_ID not in lost_node["output"] and DUMMY_SECRET not in lost_node["output"]
    for frame in (lost_node["trials"], lost_node["history"]):
        assert not frame.astype(str).apply(lambda col: col.str.contains("TUNELFMDUMMY|tuneLfmDummy")).any().any()
    written = [p for p in lost_node["dir"].rglob("*") if p.is_file()]  # Ray's state, params, results, checkpoints
    assert len(written) > 5
    assert not files_containing(written, DUMMY_KEY_ID, DUMMY_SECRET)


@pytest.mark.slow
def test_credentials_in_the_driver_environment_reach_no_ray_log(cluster, lost_node):
    """Ray Tune copies AWS_* variables from the driver into each trial's runtime_env, and Ray's runtime-env agent
    logs runtime_envs in plain text on every node; the driver must keep them out (trials use their node's own)."""
    logs = [p for p in Path(cluster["state"]["temp_dir"]).rglob("logs/*") if p.is_file()]
    assert len(logs) > 10
    assert not files_containing(logs, DUMMY_KEY_ID, DUMMY_SECRET)


@pytest.mark.slow
def test_lost_worker_node_its_trial_goes_on_elsewhere_from_its_checkpoint_and_the_sweep_completes(lost_node):
    """The trial on the lost node is retried on worker-1 and continues from its checkpoint on the shared storage,
    each step recorded once, with the numbers of a run that was never interrupted."""
    trials, history = lost_node["trials"], lost_node["history"]
    assert lost_node["victim"]["node_id"] not in set(trials["node_id"])
    assert sorted(trials["attempts"]) == [1, 2]  # the trial on the lost node failed once, then ran elsewhere
    [moved] = [row for _, row in trials.iterrows() if row["attempts"] == 2]
    assert moved["resumed_from_step"] in (4, 8, 12)  # from its checkpoint on the shared storage, not from step 0
    assert not history.duplicated(["trial_id", "step"]).any()
    resumed = history[history["trial_id"] == moved["trial_id"]].sort_values("step")
    assert list(resumed["step"]) == list(range(1, 17))

    from tune_lfm.config import config_from_dict
    from tune_lfm.trial import run_trial

    described = json.loads((Path(moved["adapter_uri"].removeprefix("file://")) / "tune_lfm_trial.json").read_text())
    uninterrupted = run_trial(config_from_dict(described["config"]), log=lambda line: None)
    assert list(resumed["loss"]) == pytest.approx([row["loss"] for row in uninterrupted["history"]], rel=1e-4)
    for metric in ("train_loss", "eval_loss", "kl", "tokens_trained"):
        assert moved[metric] == pytest.approx(uninterrupted[metric], rel=1e-3), metric
