"""The team server of mlflow/launch.sh, run for real: a throwaway PostgreSQL cluster (tracking and auth
databases), MLflow's basic-auth app, artifacts proxied by the server onto a local folder. A non-admin
user logs a pipeline through it, a wrong password is refused with one line, the run's page is rendered
in headless Chromium, and SIGTERM stops the script and frees the port.

One server start serves the whole module (module-scoped fixtures); the tests run in file order and the
last one stops it. Needs Debian's `postgresql` and `chromium` (as root: apt-get install -y
--no-install-recommends postgresql chromium); without them the tests skip and say so."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, last_json, pipeline_file, run_cli, run_main, wait_for_health

INSTALL = "install it with: apt-get install -y --no-install-recommends postgresql chromium (as root)"
CHROMIUM = "/usr/bin/chromium"
USER, USER_PASSWORD = "alice", "alice-" + secrets.token_hex(8)
ADMIN, ADMIN_PASSWORD = "admin", "admin-" + secrets.token_hex(8)
DB_PASSWORD = "db-" + secrets.token_hex(8)


def _pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL server (/usr/lib/postgresql/<major>/bin), else initdb on PATH."""
    dirs = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if (Path(d) / "initdb").is_file()]
    dirs.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    if dirs:
        return dirs[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _scratch_dir() -> str | None:
    """/dev/shm when it is a roomy tmpfs (a throwaway cluster needs no disk; removing one from a busy disk
    took seconds), else the default temp folder."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize >= 1 << 30 and os.access("/dev/shm", os.W_OK) else None


@dataclass
class PgCluster:
    bindir: Path
    base: Path  # data/, the log and the socket; owned by the user postgres runs as
    port: int
    as_owner: list[str] = field(default_factory=list)  # `runuser -u postgres --` when we are root

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([*self.as_owner, str(self.bindir / cmd[0]), *cmd[1:]], cwd=self.base,
                             capture_output=True, text=True, timeout=timeout)  # a hang guard
        assert res.returncode == 0, f"{cmd[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        return res

    def connect(self, dbname: str, superuser: bool = False):
        """psycopg (3) connection: the superuser over the socket (trust), or `mlflow` over TCP with its password."""
        import psycopg

        if superuser:
            return psycopg.connect(host=str(self.base), port=self.port, user="postgres", dbname=dbname,
                                   autocommit=True, connect_timeout=30)
        return psycopg.connect(host="127.0.0.1", port=self.port, user="mlflow", password=DB_PASSWORD, dbname=dbname,
                               autocommit=True, connect_timeout=30)

    def query(self, dbname: str, sql: str, *args) -> list[tuple]:
        with self.connect(dbname) as conn:
            return conn.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temp folder on 127.0.0.1:<free port>, role `mlflow` (password) owning the
    databases `mlflow` and `mlflow_auth`; stopped and removed at the end."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL server not found; {INSTALL}")
    as_owner: list[str] = []
    # not under pytest's tmp (root-only): postgres must reach it
    base = Path(tempfile.mkdtemp(prefix="deploypipe-pg-", dir=_scratch_dir()))
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip(f"running as root and there is no 'postgres' user to run the server; {INSTALL}")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    pg = PgCluster(bindir, base, free_port(), as_owner)
    started = False
    try:
        pg.run("initdb", "-D", str(base / "data"), "-U", "postgres", "--auth-local=trust",
               "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        # a throwaway cluster: no fsync; TCP on loopback only, the socket in our folder
        opts = (f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {base} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        pg.run("pg_ctl", "-D", str(base / "data"), "-l", str(base / "postgres.log"), "-o", opts, "-w", "-t", "60",
               "start")
        started = True
        with pg.connect("postgres", superuser=True) as conn:
            conn.execute(f"CREATE ROLE mlflow LOGIN PASSWORD '{DB_PASSWORD}'")
            conn.execute("CREATE DATABASE mlflow OWNER mlflow")
            conn.execute("CREATE DATABASE mlflow_auth OWNER mlflow")
        yield pg
    finally:
        if started:
            pg.run("pg_ctl", "-D", str(base / "data"), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class TeamServer:
    uri: str
    port: int
    proc: subprocess.Popen
    artifacts: Path
    tmp: Path  # TMPDIR of launch.sh: its private auth config lives here while it runs
    log: Path
    pg: PgCluster

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """mlflow/launch.sh itself, in its own process group, against the cluster: basic-auth, 1 worker,
    artifacts proxied to a local folder (given as a file:// URI), the DB password in PGPASSWORD only."""
    root = tmp_path_factory.mktemp("team-server")
    artifacts, tmp = root / "artifacts", root / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's `mlflow`
        "DEPLOYPIPE_MLFLOW_PYTHON": sys.executable,
        "DEPLOYPIPE_MLFLOW_DB_URI": f"postgresql://mlflow@127.0.0.1:{postgres.port}/mlflow",
        "DEPLOYPIPE_MLFLOW_AUTH_DB_URI": f"postgresql://mlflow@127.0.0.1:{postgres.port}/mlflow_auth",
        "DEPLOYPIPE_MLFLOW_ARTIFACTS": artifacts.as_uri(),
        "DEPLOYPIPE_MLFLOW_PORT": str(port),
        "DEPLOYPIPE_MLFLOW_WORKERS": "1",
        "DEPLOYPIPE_MLFLOW_ADMIN_USER": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "PGPASSWORD": DB_PASSWORD,
        "TMPDIR": str(tmp),
    })
    log = root / "launch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "launch.sh")], env=env, cwd=root, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = TeamServer(f"http://127.0.0.1:{port}", port, proc, artifacts, tmp, log, postgres)
    try:
        try:
            wait_for_health(server.uri, proc, seconds=180)  # a hang guard (tables are created on first start)
        except RuntimeError as err:
            pytest.fail(f"launch.sh did not bring the server up: {err}\n{server.log_tail()}")
        yield server
    finally:
        if proc.poll() is None:  # the last test stops it with SIGTERM and checks; this is the fallback
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


@pytest.fixture(scope="module")
def user(team_server) -> tuple[str, str]:
    """A non-admin user, created by the admin through the REST API."""
    api = team_server.uri + "/api/2.0/mlflow/users"
    res = requests.post(api + "/create", json={"username": USER, "password": USER_PASSWORD},
                        auth=(ADMIN, ADMIN_PASSWORD), timeout=30)
    assert res.ok, (res.status_code, res.text[:500])
    got = requests.get(api + "/get", params={"username": USER}, auth=(ADMIN, ADMIN_PASSWORD), timeout=30)
    assert got.ok and got.json()["user"]["is_admin"] is False, got.text[:500]
    return USER, USER_PASSWORD


@pytest.fixture(scope="module")
def pipeline_run(team_server, user, tmp_path_factory) -> dict:
    """The two-stage quick pipeline (train, evaluate on 300 digits), logged by the non-admin user."""
    cwd = tmp_path_factory.mktemp("team-client")
    res = run_cli("run", str(pipeline_file(cwd, epochs=1)), "--workdir", "runs", "--json",
                  "--tracking-uri", team_server.uri, cwd=cwd,
                  env={"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]})
    assert res.returncode == 0, res.stderr[-3000:] + "\n" + team_server.log_tail()
    summary = last_json(res.stdout)
    summary["cwd"] = cwd
    return summary


def _as(monkeypatch, user: tuple[str, str], uri: str):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    return MlflowClient(tracking_uri=uri)


def _children(client, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in runs}


def test_a_non_admin_user_logs_a_pipeline_into_postgresql_and_the_artifacts_folder(team_server, user, pipeline_run,
                                                                                    monkeypatch):
    client = _as(monkeypatch, user, team_server.uri)
    parent = client.get_run(pipeline_run["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["deploypipe.kind"] == "pipeline"
    children = _children(client, parent)
    assert sorted(children) == ["evaluate", "train"]
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        assert run.data.params and "stage_seconds" in run.data.metrics, name
    assert 0 <= children["evaluate"].data.metrics["test_top1"] <= 1
    # proxied artifacts: the client sent them to the server, which wrote them under the artifacts folder
    # (<experiment>/<run>/artifacts/...), byte for byte what the stage wrote locally
    train = children["train"]
    assert train.info.artifact_uri.startswith("mlflow-artifacts:"), train.info.artifact_uri
    on_server = team_server.artifacts / parent.info.experiment_id / train.info.run_id / "artifacts"
    local = Path(pipeline_run["outputs"])
    if not local.is_absolute():
        local = pipeline_run["cwd"] / local
    assert (on_server / "model" / "weights.pt").is_file(), sorted(p.name for p in team_server.artifacts.rglob("*"))
    assert (on_server / "model" / "weights.pt").read_bytes() == (local / "train" / "model" / "weights.pt").read_bytes()
    assert {a.path for a in client.list_artifacts(train.info.run_id, "model")} >= {"model/weights.pt"}
    parent_yaml = team_server.artifacts / parent.info.experiment_id / parent.info.run_id / "artifacts" / "pipeline.yaml"
    assert parent_yaml.is_file()
    # the rows are in PostgreSQL (read with the mlflow role, not through the server)
    rows = dict(team_server.pg.query("mlflow", "SELECT run_uuid, status FROM runs"))
    for run in (parent, *children.values()):
        assert rows.get(run.info.run_id) == "FINISHED", (run.info.run_name, rows)
    metric = team_server.pg.query("mlflow", "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = %s",
                                  children["evaluate"].info.run_id, "test_top1")
    assert metric == [(children["evaluate"].data.metrics["test_top1"],)]
    assert sorted(team_server.pg.query("mlflow_auth", "SELECT username, is_admin FROM users")) == [
        (ADMIN, True), (USER, False)]


def test_a_wrong_password_is_refused_with_one_line(team_server, user, pipeline_run, tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # only the credentials given below
    before = team_server.pg.query("mlflow", "SELECT count(*) FROM runs")
    res = run_cli("run", str(pipeline_file(tmp_path, epochs=1)), "--workdir", "runs", "--tracking-uri",
                  team_server.uri, cwd=tmp_path,
                  env={"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1] + "-wrong"})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"error: tracking server {team_server.uri}") and "authentication failed" in lines[0]
    assert "MLFLOW_TRACKING_USERNAME" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert team_server.pg.query("mlflow", "SELECT count(*) FROM runs") == before  # nothing was logged
    assert not (tmp_path / "runs" / "quick").exists()  # nor run
    # no credentials at all: told to set them (the CLI's entry point in this process: it stops before any stage)
    code, _, err = run_main("run", str(pipeline_file(tmp_path, epochs=1)), "--workdir", "runs", "--tracking-uri",
                            team_server.uri, cwd=tmp_path)
    assert code == 2 and err.strip() == (
        f"error: tracking server {team_server.uri} requires a login (HTTP 401) — fix: "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"), err


def test_the_run_page_lists_the_child_runs_in_headless_chromium(team_server, user, pipeline_run, monkeypatch,
                                                                 tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found; {INSTALL}")
    from playwright.sync_api import sync_playwright

    client = _as(monkeypatch, user, team_server.uri)
    parent = client.get_run(pipeline_run["run_id"])
    children = _children(client, parent)
    url = f"{team_server.uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    with sync_playwright() as pw:  # the Debian browser; nothing is downloaded
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, timeout=120_000,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(http_credentials={"username": user[0], "password": user[1]},
                                          viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.goto(url, timeout=120_000)
            # the parent's page names each child run in a link to that run (its params also mention "train",
            # so match the link, not the word)
            links = {}
            for name, run in children.items():
                link = page.locator(f'a[href*="/runs/{run.info.run_id}"]').first
                link.wait_for(timeout=120_000)  # a hang guard: the SPA fetches the run, then its children
                links[name] = link.inner_text().strip()
            page.screenshot(path=str(tmp_path / "team_server_run.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'team_server_run.png'}")
        finally:
            browser.close()
    assert links == {name: name for name in children}
    assert sorted(links) == ["evaluate", "train"]


def test_sigterm_stops_launch_sh_frees_the_port_and_removes_the_auth_config(team_server):
    proc = team_server.proc
    assert proc.poll() is None, team_server.log_tail()
    assert len(list(team_server.tmp.glob("deploypipe-mlflow-auth.*/basic_auth.ini"))) == 1  # while it runs
    proc.send_signal(signal.SIGTERM)  # to the script alone: it forwards TERM to the server
    try:
        proc.wait(60)  # a hang guard
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch.sh still runs 60 s after SIGTERM\n{team_server.log_tail()}")
    deadline = time.time() + 30  # the workers close the socket as the group exits
    while _port_open(team_server.port) and time.time() < deadline:
        time.sleep(0.3)
    assert not _port_open(team_server.port), "the port still accepts connections after launch.sh exited"
    assert list(team_server.tmp.glob("deploypipe-mlflow-auth.*")) == []  # its private auth config is gone with it
