"""A real deployment on loopback: one SuperLink, N SuperNodes and ``flwr run`` against them.

Unlike tests/test_flwr_run.py (simulation runtime), every client here is its own
``flower-supernode`` process that learns its partition from ``--node-config``, and the run is
submitted over the SuperLink's HTTP API, first without TLS and then over TLS with
certificates this test generates itself. In Flower 1.41 the SuperLink serves its Fleet,
Control and Runtime APIs on one ``--port``; the ``flwr`` CLI finds it through a named
SuperLink connection in ``$FLWR_HOME/config.toml``.

The test stops exactly the processes it started, and the processes those spawned
(SuperExec, ServerApp, ClientApp), by process id.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from baselines import untrained_student_accuracy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_flwr_run import _cmdlines, with_parent_pid_children

from fedkd.config import PartitionConfig, RunConfig
from fedkd.results import read_metrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_NODES = 2
STARTUP_TIMEOUT = 120.0
RUN_TIMEOUT = 300.0

needs_flower = pytest.mark.skipif(
    any(shutil.which(name, path=str(BIN)) is None for name in ("flwr", "flower-superlink", "flower-supernode")),
    reason="Flower's executables are not installed next to this Python",
)


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports the OS has just handed out (all bound at once, then released)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@dataclass(frozen=True)
class Certificates:
    ca: Path
    certificate: Path
    key: Path


def write_certificates(directory: Path) -> Certificates:
    """A self-signed CA and a server certificate it signs for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkd test CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    certificates = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certificates.ca.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    certificates.certificate.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    certificates.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificates


def descendants(pids: list[int]) -> dict[int, psutil.Process]:
    """``pids``, their children (transitively) and whatever names one of them as --parent-pid.

    The SuperLink starts its SuperExec in a new session and SuperExecs start ServerApp and
    ClientApp processes; a child orphaned by a crash still carries ``--parent-pid``.
    """
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found[pid] = process
            found.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    for pid in with_parent_pid_children(set(found), _cmdlines()) - set(found):
        try:
            found[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
    return found


def running(processes) -> list[int]:
    """Ids of the processes that still run (a psutil.Process no longer matches a reused id)."""
    living = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(living)


@dataclass
class Deployment:
    """The processes one test started, with their logs under ``root``."""

    root: Path
    env: dict[str, str]
    started: list[subprocess.Popen] = field(default_factory=list)
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    commands: dict[int, str] = field(default_factory=dict)  # what each seen process ran
    logs: list[Path] = field(default_factory=list)
    killed: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, command: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with log.open("w") as stream:
            stream.write("$ " + " ".join(command) + "\n")
            stream.flush()
            process = subprocess.Popen(
                command,
                env={**self.env, "FLWR_HOME": str(home)},
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
            )
        self.started.append(process)
        self.track()
        return process

    def track(self) -> None:
        """Remember every process now descended from ours (the ServerApp and ClientApps come and go).

        A psutil.Process remembers its start time, so one that has ended is never mistaken
        for an unrelated process that later gets the same id.
        """
        for pid, process in descendants([process.pid for process in self.started]).items():
            known = self.seen.get(pid)
            if known is None or not known.is_running():
                self.seen[pid] = process
                try:
                    self.commands[pid] = " ".join(process.cmdline())
                except psutil.Error:
                    self.commands[pid] = "?"

    def crash(self, process: subprocess.Popen) -> None:
        """SIGKILL one of our processes and everything below it at once, as when its machine dies."""
        self.track()
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(tree, timeout=10)
        process.wait(timeout=10)
        self.killed.append(process)

    def output(self, tail: int = 4000) -> str:
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"----- {log.name} -----\n{text[-tail:]}")
        return "\n".join(parts)

    def stop_all(self) -> list[int]:
        """SIGTERM, then SIGKILL, our processes and their descendants; returns any still running."""
        for _ in range(2):  # a second pass catches a child spawned while the first one ran
            self.track()
            processes = list(self.seen.values())
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.terminate()
            _, remaining = psutil.wait_procs(processes, timeout=15)
            for process in remaining:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(remaining, timeout=5)
            for process in self.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1)  # reap our direct children
        self.track()
        return running(self.seen.values())


def wait_until_healthy(deployment: Deployment, superlink: subprocess.Popen, url: str, verify) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert superlink.poll() is None, "flower-superlink exited early\n" + deployment.output()
        try:
            if httpx.get(url, timeout=2.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"SuperLink not healthy at {url} after {STARTUP_TIMEOUT} s\n" + deployment.output())


# Called about once a second while the run goes on: (deployment, the run's output folder, a
# function that starts the SuperNode of partition k under a log name and returns it).
DuringRun = Callable[[Deployment, Path, Callable[[int, str], subprocess.Popen]], None]


def deploy_and_run(
    tmp_path: Path,
    *,
    rounds: int,
    certificates: Certificates | None,
    num_nodes: int = NUM_NODES,
    during_run: DuringRun | None = None,
    extra_run_config: str = "",
    run_timeout: float = RUN_TIMEOUT,
) -> tuple[list[dict], Deployment]:
    """Start the SuperLink and the SuperNodes, run the app with ``flwr run``, stop everything."""
    port, *node_ports = free_ports(1 + num_nodes)  # the SuperLink's API, each SuperNode's Runtime API
    address = f"127.0.0.1:{port}"
    output_dir = tmp_path / "run"
    homes = tmp_path / "homes"
    env = {
        **os.environ,
        # The ServerApp would otherwise `uv sync` the app's dependencies (a CUDA torch).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    deployment = Deployment(root=tmp_path, env=env)

    if certificates is None:
        link_tls = ["--insecure"]
        node_tls = ["--insecure"]
        connection = f'address = "{address}"\ninsecure = true\n'
        verify: object = False
        scheme = "http"
    else:
        link_tls = [
            "--ssl-ca-certfile",
            str(certificates.ca),
            "--ssl-certfile",
            str(certificates.certificate),
            "--ssl-keyfile",
            str(certificates.key),
        ]
        node_tls = ["--root-certificates", str(certificates.ca)]
        connection = f'address = "{address}"\nroot-certificates = "{certificates.ca}"\n'
        verify = str(certificates.ca)
        scheme = "https"

    # The flwr CLI reads its SuperLink connections from $FLWR_HOME/config.toml.
    cli_home = homes / "cli"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedkd-test"\n\n[superlink.fedkd-test]\n{connection}'
    )

    try:
        superlink = deployment.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *link_tls,
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            homes / "superlink",
        )
        wait_until_healthy(deployment, superlink, f"{scheme}://{address}/health", verify)
        if certificates is not None:  # TLS only: no plain HTTP, and a CA the system does not know
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://{address}/health", timeout=5.0)
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(f"https://{address}/health", timeout=5.0)

        def start_node(k: int, name: str) -> subprocess.Popen:
            # A restarted node gets a fresh port: the dead one's may still be held by the kernel.
            (node_port,) = (node_ports[k],) if name == f"supernode-{k}" else free_ports(1)
            return deployment.start(
                name,
                [
                    str(BIN / "flower-supernode"),
                    *node_tls,
                    "--superlink",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(node_port),
                    "--node-config",
                    f"partition-id={k} num-partitions={num_nodes}",
                ],
                homes / name,
            )

        for k in range(num_nodes):
            start_node(k, f"supernode-{k}")

        run_config = (
            f"num-clients={num_nodes} rounds={rounds} public-size=300 local-epochs=2 distill-epochs=3 "
            f'partition="iid" student-model="cnn_small" output-dir="{output_dir}" {extra_run_config}'
        )
        command = [str(BIN / "flwr"), "run", str(REPO), "fedkd-test", "--stream", "--run-config", run_config]
        runner = deployment.start("flwr-run", command, cli_home)
        deadline = time.monotonic() + run_timeout
        while runner.poll() is None and time.monotonic() < deadline:
            deployment.track()
            if during_run is not None:
                during_run(deployment, output_dir, start_node)
            for process in deployment.started:
                if process is not runner and process not in deployment.killed:
                    assert process.poll() is None, f"{process.args[0]} exited early\n" + deployment.output()
            time.sleep(1.0)
        assert runner.returncode is not None, f"flwr run still running after {run_timeout} s\n" + deployment.output()
        assert runner.returncode == 0, "flwr run failed\n" + deployment.output()
        rows = read_metrics(output_dir)
        assert [row["round"] for row in rows] == list(range(1, rounds + 1)), deployment.output()
    finally:
        survivors = deployment.stop_all()
    assert survivors == [], f"processes still alive after stopping: {survivors}\n" + deployment.output()
    # The SuperLink and each SuperNode started a SuperExec, and the test saw (and stopped) them.
    superexecs = [command for command in deployment.commands.values() if "flower-superexec" in command]
    assert len(superexecs) == 1 + len(deployment.started) - 2, deployment.commands  # not for flwr run, SuperLink
    return rows, deployment


def assert_student_learned(rows: list[dict], *, num_nodes: int = NUM_NODES, every_round: bool = True) -> None:
    if every_round:
        assert all(row["clients"] == num_nodes for row in rows), rows
    first, last = rows[0]["student_accuracy"], rows[-1]["student_accuracy"]
    # in process, the same run with three clients ended 0.35-0.54 above untrained over seeds 0-4
    same_run = RunConfig(
        dataset="digits",
        num_clients=num_nodes,
        rounds=len(rows),
        public_size=300,
        local_epochs=2,
        distill_epochs=3,
        partition=PartitionConfig(scheme="iid"),
        student_model="cnn_small",
    )
    assert last > untrained_student_accuracy(same_run) + 0.15, rows
    assert last >= first - 0.05, rows


@pytest.mark.slow
@needs_flower
def test_tls_deployment_trains_a_student(tmp_path):
    certificates = write_certificates(tmp_path / "certificates")
    assert_student_learned(deploy_and_run(tmp_path, rounds=2, certificates=certificates)[0])


def supernode_id(log: Path) -> int:
    """The node id a SuperNode was given, from its log (Flower logs ``SuperNode ID: <id>``)."""
    match = re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))
    assert match is not None, f"{log.name} names no SuperNode ID yet"
    return int(match.group(1))


@pytest.mark.slow
@needs_flower
def test_a_supernode_killed_in_round_two_fails_that_round_and_its_restart_rejoins(tmp_path):
    """Three SuperNodes; when round 2 starts, partition 2's SuperNode (and its SuperExec and
    ClientApp) is SIGKILLed. Flower marks it offline once its heartbeats stop, its round-2 task
    ends in an error, and the round goes on with the other two. After round 2 a new SuperNode
    for partition 2 starts; it gets a new node id and answers in round 3.

    It is also the insecure deployment's end-to-end test: without TLS, the student learns."""
    events: dict[str, int] = {}

    def kill_then_restart(deployment: Deployment, output_dir: Path, start_node) -> None:
        metrics = output_dir / "metrics.jsonl"
        rounds_done = metrics.read_text().count("\n") if metrics.exists() else 0  # complete rows only
        if rounds_done >= 1 and "killed" not in events:
            victim = next(p for p in deployment.started if "partition-id=2" in " ".join(map(str, p.args)))
            events["killed"] = supernode_id(deployment.root / "supernode-2.log")
            deployment.crash(victim)
        if rounds_done >= 2 and "restarted" not in events:
            start_node(2, "supernode-2-restarted")
            events["restarted"] = 1

    # Three rounds, one of them waiting up to a minute for Flower to declare the node dead.
    rows, deployment = deploy_and_run(
        tmp_path, rounds=3, certificates=None, num_nodes=3, during_run=kill_then_restart, run_timeout=2 * RUN_TIMEOUT
    )
    killed, rejoined = events["killed"], supernode_id(deployment.root / "supernode-2-restarted.log")
    assert rejoined != killed
    assert [(row["clients"], row["failed_nodes"]) for row in rows] == [(3, []), (2, [killed]), (3, [])], rows
    assert_student_learned(rows, num_nodes=3, every_round=False)
