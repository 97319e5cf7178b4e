"""A multi-node Ray cluster on one machine: a head and N workers, each with its own raylet, for drills and tests.

    python cluster/local_cluster.py start [--workers 2] [--gpus-per-worker 1] [--cpus-per-node 1] [--dashboard]
    python cluster/local_cluster.py status [--json]
    python cluster/local_cluster.py address            # for --address "$(...)"
    python cluster/local_cluster.py kill worker-2      # SIGKILL one node, as if its machine died
    python cluster/local_cluster.py stop

Why this exists: the code paths that only a cluster exercises (trials on other nodes, a node lost mid-sweep, shared
storage) can then be run on a laptop or in CI. Each node is one `ray start --block` process in a session of its own,
so a node is killed or stopped as a unit. `stop` ends exactly the processes this script started (recorded in the
state directory), never `ray stop`, which would end every Ray instance on the machine. Workers get logical GPUs
(`--num-gpus` without hardware), so `--gpus-per-trial 1` places one trial per worker, as on a GPU cluster.
Every port is picked free, so the cluster coexists with other Ray instances; the dashboard (and, with --dashboard,
its job server) listens on 127.0.0.1 only; the nodes use Ray's token auth (RAY_AUTH_MODE=token, token in
~/.ray/auth_token, created if missing); and the cluster's temp dir, with its address file, lives in the state
directory, so a plain `ray.init()` elsewhere on the machine does not attach to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

DEFAULT_STATE_DIR = Path(tempfile.gettempdir()) / "tune_lfm_cluster"
STATE_FILE = "cluster.json"
LOOPBACK = "127.0.0.1"  # the dashboard and its job server listen here only
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # small: trials pass only metrics through the object store
START_TIMEOUT_S = 120
AUTH_MODE_VAR = "RAY_AUTH_MODE"  # "token": every client must present Ray's token; drivers need it set too


class ClusterError(RuntimeError):
    """The local cluster could not be started, found or stopped."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_ip_address() -> str:
    """The address Ray gives this machine's nodes (Ray rewrites 127.0.0.1 in an address to it anyway)."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def ray_executable() -> str:
    """The `ray` next to this Python, so nodes run the same Ray as the driver that connects to them."""
    candidate = Path(sys.executable).with_name("ray")
    found = str(candidate) if candidate.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command was not found; install the project (pip install -e .)")
    return found


def node_command(role: str, address: str, cpus: int, gpus: int, temp_dir: Path, dashboard: bool,
                 ports: dict[str, int]) -> list[str]:
    """`ray start` for one node; every node gets its own agent port, since all of them share this machine's IP, and
    its own temp dir, where Ray unpacks a job's `--working-dir` (nodes sharing one would delete each other's copy)."""
    command = [ray_executable(), "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}",
               f"--num-gpus={gpus}", f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}",
               f"--dashboard-agent-listen-port={free_port()}"]
    if role == "head":
        command += ["--head", f"--port={ports['gcs']}", f"--include-dashboard={str(dashboard).lower()}",
                    f"--dashboard-host={LOOPBACK}", f"--dashboard-port={ports['dashboard']}"]
    else:
        command += [f"--address={address}"]
    return command


def ensure_auth_token() -> None:
    """Make sure Ray's token exists (~/.ray/auth_token), without printing it: the nodes run with token auth."""
    subprocess.run([ray_executable(), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL, check=True)


def launch_node(name: str, command: list[str], log_dir: Path) -> dict:
    """One node = one `ray start --block` in a new session: its process group holds the node's Ray processes."""
    log = log_dir / f"{name}.log"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, AUTH_MODE_VAR: "token"}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    return {"name": name, "pid": process.pid, "log": str(log)}


def _check_alive(nodes: list[dict]) -> None:
    for node in nodes:
        try:
            exited = psutil.Process(node["pid"]).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            exited = True
        if exited:
            tail = Path(node["log"]).read_text()[-2000:]
            raise ClusterError(f"node {node['name']} exited while starting; its log ({node['log']}):\n{tail}")


def _gcs_listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for_gcs(address: str, nodes: list[dict]) -> None:
    """Poll the head's GCS port first: `ray.init` would wait without end for a GCS that never comes up."""
    deadline = time.time() + START_TIMEOUT_S
    while not _gcs_listening(address):
        _check_alive(nodes)
        if time.time() > deadline:
            raise ClusterError(f"no Ray GCS answered at {address} within {START_TIMEOUT_S} s")
        time.sleep(0.5)


def wait_for_alive_nodes(expected: int, nodes: list[dict]) -> None:
    """Block until the connected cluster lists `expected` alive nodes; fail early, with its log, if a node exits."""
    import ray

    deadline = time.time() + START_TIMEOUT_S
    while sum(n["Alive"] for n in ray.nodes()) < expected:
        _check_alive(nodes)
        if time.time() > deadline:
            raise ClusterError(f"the cluster did not show {expected} alive nodes within {START_TIMEOUT_S} s")
        time.sleep(0.5)


def node_processes(pid: int) -> list[psutil.Process]:
    """A node's processes: its `ray start` process and every descendant (raylet, agents, trial workers)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def raylet_node_id(pid: int) -> str | None:
    """The Ray node id of a node, read from its raylet's command line (`--node_id=<hex>`)."""
    for process in node_processes(pid):
        try:
            args = process.cmdline()
        except psutil.Error:
            continue
        if args and os.path.basename(args[0]) == "raylet":
            for arg in args:
                if arg.startswith("--node_id="):
                    return arg.split("=", 1)[1]
    return None


def signal_nodes(nodes: list[dict], sig: int, grace_s: float = 5) -> None:
    """Signal each node's process group and every descendant (snapshotted first: Ray puts its worker processes in
    groups of their own), then SIGKILL whatever is still alive after `grace_s`."""
    processes = [process for node in nodes for process in node_processes(node["pid"])]
    for node in nodes:
        try:
            os.killpg(node["pid"], sig)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


# ---------------------------------------------------------------- state on disk

def load_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def save_state(state_dir: Path, state: dict) -> None:
    temporary = state_dir / f"{STATE_FILE}.tmp"
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(state_dir / STATE_FILE)


def find_node(state: dict, name: str) -> dict:
    for node in state["nodes"]:
        if node["name"] == name:
            return node
    raise ClusterError(f"no node named {name!r}; nodes: {', '.join(n['name'] for n in state['nodes'])}")


# ---------------------------------------------------------------- commands

def start(state_dir: Path, workers: int = 2, cpus_per_node: int = 1, gpus_per_worker: int = 1,
          head_cpus: int = 1, dashboard: bool = False) -> dict:
    """Start the head and `workers` worker nodes; returns the state (address, dashboard URL, nodes)."""
    existing = load_state(state_dir)
    if existing and any(psutil.pid_exists(n["pid"]) for n in existing["nodes"]):
        raise ClusterError(f"a local cluster from {state_dir} is running ({existing['address']}); stop it first")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ[AUTH_MODE_VAR] = "token"  # before Ray is imported here: it reads the mode once
    ensure_auth_token()
    temp_dir, log_dir = state_dir / "ray", state_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    ports = {"gcs": free_port(), "dashboard": free_port()}
    address = f"{node_ip_address()}:{ports['gcs']}"
    state = {"address": address, "dashboard_url": f"http://{LOOPBACK}:{ports['dashboard']}" if dashboard else None,
             "temp_dir": str(temp_dir), "nodes": []}
    try:
        head = node_command("head", address, head_cpus, 0, temp_dir / "head", dashboard, ports)
        state["nodes"].append(launch_node("head", head, log_dir))
        save_state(state_dir, state)
        wait_for_gcs(address, state["nodes"])
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            wait_for_alive_nodes(1, state["nodes"])
            for index in range(1, workers + 1):  # one at a time: raylets of one session name their sockets in turn
                command = node_command("worker", address, cpus_per_node, gpus_per_worker, temp_dir / f"worker-{index}",
                                       False, ports)
                state["nodes"].append(launch_node(f"worker-{index}", command, log_dir))
                save_state(state_dir, state)
                wait_for_alive_nodes(1 + index, state["nodes"])
        finally:
            ray.shutdown()
    except BaseException:
        stop(state_dir)
        raise
    for node in state["nodes"]:
        node["node_id"] = raylet_node_id(node["pid"])
    save_state(state_dir, state)
    return state


def status(state_dir: Path) -> dict:
    state = load_state(state_dir)
    if state is None:
        raise ClusterError(f"no local cluster recorded in {state_dir}")
    for node in state["nodes"]:
        node["alive"] = raylet_node_id(node["pid"]) is not None
    return state


def kill(state_dir: Path, name: str) -> dict:
    """SIGKILL one node (its whole process group): a machine lost mid-sweep, for fault drills."""
    state = status(state_dir)
    node = find_node(state, name)
    signal_nodes([node], signal.SIGKILL)
    node["alive"] = False
    return node


def stop(state_dir: Path) -> None:
    """Stop every node at once: SIGTERM, then SIGKILL whatever is left after a grace period (a scratch cluster has
    nothing to drain)."""
    state = load_state(state_dir)
    if state is None:
        return
    signal_nodes(state["nodes"], signal.SIGTERM)
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def hints(state: dict, state_dir: Path) -> list[str]:
    """Commands that run a sweep on this cluster, from the repository root (tests run them as printed).

    `--scale tiny` because the workers' GPUs are logical: `auto` would pick full scale (the real model, on CPUs);
    `--gpus-per-trial 1` places one trial on each worker, as on a GPU cluster."""
    sweep = (f"python -m tune_lfm.search optimizers --scale tiny --gpus-per-trial 1 "
             f"--storage file://{state_dir.absolute()}/sweeps")
    commands = [f"RAY_AUTH_MODE=token {sweep} --address {state['address']}"]
    if state["dashboard_url"]:
        commands.append(f"RAY_AUTH_MODE=token ray job submit --address {state['dashboard_url']} --working-dir . -- "
                        f"{sweep}")
    return commands


def count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/local_cluster.py", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"where the cluster's state, logs and Ray temp dir live (default {DEFAULT_STATE_DIR})")
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start a head and worker nodes")
    begin.add_argument("--workers", type=count(1), default=2)
    begin.add_argument("--cpus-per-node", type=count(1), default=1, help="logical CPUs of each worker node")
    begin.add_argument("--head-cpus", type=count(0), default=1, help="logical CPUs of the head (0: no trials there)")
    begin.add_argument("--gpus-per-worker", type=count(0), default=1, help="logical GPUs of each worker node")
    begin.add_argument("--dashboard", action="store_true",
                       help="start the dashboard and job server on 127.0.0.1 (needs pip install 'ray[default]')")
    show = commands.add_parser("status", help="address, dashboard and nodes (alive, node id)")
    show.add_argument("--json", action="store_true")
    commands.add_parser("address", help="print the cluster's address (host:port) only")
    end = commands.add_parser("kill", help="SIGKILL one node, e.g. worker-2")
    end.add_argument("node")
    commands.add_parser("stop", help="stop every node this script started")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            state = start(args.state_dir, args.workers, args.cpus_per_node, args.gpus_per_worker, args.head_cpus,
                          args.dashboard)
            print(f"cluster up: {1 + args.workers} nodes at {state['address']}; clients need RAY_AUTH_MODE=token")
            for hint in hints(state, args.state_dir):
                print(f"  {hint}")
        elif args.command == "status":
            state = status(args.state_dir)
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                print(f"address {state['address']}  dashboard {state['dashboard_url'] or 'off'}")
                for node in state["nodes"]:
                    print(f"  {node['name']:10} pid {node['pid']:<8} {'alive' if node['alive'] else 'DEAD':5} "
                          f"{node.get('node_id') or ''}")
        elif args.command == "address":
            print(status(args.state_dir)["address"])
        elif args.command == "kill":
            node = kill(args.state_dir, args.node)
            print(f"killed {node['name']} (pid {node['pid']})")
        else:
            stop(args.state_dir)
            print("cluster stopped")
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
