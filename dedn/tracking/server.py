"""Team mode: an MLflow tracking server on PostgreSQL with proxied artifacts and basic authentication.

The embedded default (`sqlite:///<DEDN_HOME>/mlflow.db`) serves one person on one machine. A team
running sweeps from several nodes needs a server: SQLite on a network filesystem with concurrent
writers is what SQLite's own documentation warns against. `start()` brings up, under one data
folder of the user's choice:

* a PostgreSQL cluster (`<dir>/postgres/data`, TCP on 127.0.0.1 only, scram-sha-256 passwords),
  or an existing database given by URL;
* `mlflow server --app-name basic-auth` on it, with `--artifacts-destination` (default
  `<dir>/artifacts`; any path or object-store URI MLflow accepts): clients upload and download
  artifacts through the server (`mlflow-artifacts:/` URIs), so workers need no access of their own.

Secrets (database password, the MLflow `admin` password, the Flask CSRF key) are generated once
into `<dir>/secrets.json` (mode 0600) and reach the servers through their environment, never a
command line. Clients connect with `MLFLOW_TRACKING_URI` and `MLFLOW_TRACKING_USERNAME` /
`MLFLOW_TRACKING_PASSWORD` (`env_lines()` prints them). `stop()` ends both servers; a later
`start()` on the same folder finds the same runs and models.

PostgreSQL refuses to run as root: as root its processes run as the `postgres` system user (which
Debian's package creates), so the data folder must be reachable by that user; the default folder
for root is `/var/lib/dedn-team`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from dedn.atomic import write_text
from dedn.cli import command
from dedn.errors import ConfigError, ServerError
from dedn.home import dedn_home
from dedn.procs import alive, descendants, kill_group
from dedn.storage import check_writable
from dedn.tracking.mlflow_settings import MLFLOW_DEFAULTS
from dedn.tracking.probe import auth_header, check_reachable, http_status

# check_reachable: dedn.tracking.probe's (the client side), named here too
__all__ = ["ServerInfo", "default_dir", "start", "stop", "status", "env_lines", "backup", "server_memory_mib",
           "check_reachable"]

ADMIN = "admin"
DB_USER = "dedn"
DATABASES = ("mlflow", "mlflow_auth")  # runs and models; MLflow's user store (its own alembic history)
STATE_FILE = "server.json"
SECRETS_FILE = "secrets.json"


def default_dir() -> Path:
    """`$DEDN_HOME/team`; for root `/var/lib/dedn-team` (PostgreSQL's user cannot reach root's home)."""
    if os.geteuid() == 0:
        return Path("/var/lib/dedn-team")
    return dedn_home() / "team"


@dataclass
class ServerInfo:
    """A running team server, as `<dir>/server.json` records it."""

    uri: str
    host: str
    port: int
    pid: int  # the `mlflow server` process (leader of its own process group)
    data_dir: str
    artifacts_destination: str
    backend: str  # the database URL without its password
    pg_data: str | None  # the PostgreSQL cluster this tool manages; None for an external database
    pg_port: int | None
    started: float

    def stop_command(self) -> str:
        return command("jobs/server.py", "stop", "--data-dir", self.data_dir)


# ---- secrets ---------------------------------------------------------------------------------------
def _secrets(root: Path) -> dict[str, str]:
    path = root / SECRETS_FILE
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ServerError(path, f"cannot be read as JSON ({e}); it holds the server's passwords") from None
    s = {"db_password": secrets.token_urlsafe(24), "admin_password": secrets.token_urlsafe(24),
         "flask_secret": secrets.token_hex(32)}
    old = os.umask(0o077)  # the temporary file is private from its first byte
    try:
        write_text(path, json.dumps(s, indent=2), fsync=True)
    finally:
        os.umask(old)
    path.chmod(0o600)
    return s


# ---- PostgreSQL ------------------------------------------------------------------------------------
def _pg_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl, pg_dump): PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return str(versions[-1])
    raise ServerError(name, "PostgreSQL's server programs are not installed (Debian: `apt-get install postgresql`; "
                            "or pass --database-url of an existing PostgreSQL database)")


def _pg_user() -> str | None:
    """The user PostgreSQL runs as: None (this one) unless we are root, then `postgres`."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("postgres", "PostgreSQL refuses to run as root and there is no `postgres` system user to run "
                                      "it as (Debian's postgresql package creates it)") from None
    return "postgres"


def _as_pg(cmd: list[str], user: str | None) -> list[str]:
    if user is None:
        return cmd
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", user, "--", *cmd]


def _run(cmd: list[str], what: str, *, env: Mapping[str, str] | None = None, timeout: float = 120) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServerError(what, f"{Path(cmd[0]).name} failed: {e}") from None
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-8:])
        raise ServerError(what, f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}` exited with "
                                f"{out.returncode}:\n{tail}")
    return out.stdout


def _pg_paths(root: Path) -> tuple[Path, Path, Path]:
    base = root / "postgres"
    return base, base / "data", base / "postgres.log"


def _ensure_cluster(root: Path, pg_port: int, db_password: str) -> Path:
    """initdb once (owner `dedn`, password auth), then this run's settings in `dedn.conf`; the data folder."""
    user = _pg_user()
    base, data, _ = _pg_paths(root)
    base.mkdir(parents=True, exist_ok=True)
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        probe = subprocess.run(_as_pg(["test", "-w", str(base)], user), capture_output=True)
        if probe.returncode != 0:
            raise ServerError(root, f"PostgreSQL runs as user {user!r} (it refuses root), and that user cannot reach this "
                                    "folder (a folder above it is private). Choose a --data-dir it can reach, e.g. "
                                    f"{default_dir()}")
    base.chmod(0o700)
    if not (data / "PG_VERSION").exists():
        pwfile = base / ".initdb-password"
        old = os.umask(0o077)
        try:
            pwfile.write_text(db_password + "\n")
            if user is not None:
                shutil.chown(pwfile, user)
            _run(_as_pg([_pg_bin("initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                         "-E", "UTF8", "--locale=C.UTF-8"], user), f"{data} (initdb)")
        finally:
            os.umask(old)
            pwfile.unlink(missing_ok=True)
        with open(data / "postgresql.conf", "a") as f:
            f.write("\ninclude_if_exists = 'dedn.conf'  # written by dedn's jobs/server.py at every start\n")
    conf = data / "dedn.conf"
    # TCP on loopback only (the MLflow server is the one client); no Unix socket, whose default
    # folder may not exist or be writable here.
    conf.write_text(f"listen_addresses = '127.0.0.1'\nport = {pg_port}\nunix_socket_directories = ''\nmax_connections = 200\n")
    if user is not None:
        shutil.chown(conf, user)
    return data


def _pg_running(data: Path) -> bool:
    pid_file = data / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _start_postgres(root: Path, pg_port: int, db_password: str) -> Path:
    data = _ensure_cluster(root, pg_port, db_password)
    _, _, log = _pg_paths(root)
    if not _pg_running(data):
        _port_free("127.0.0.1", pg_port, "--pg-port")
        _run(_as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"], _pg_user()),
             f"PostgreSQL in {data} (log: {log})")
    _create_databases(f"postgresql://{DB_USER}@127.0.0.1:{pg_port}/postgres", db_password)
    return data


def _create_databases(admin_url: str, password: str) -> None:
    import psycopg  # only `start` needs the PostgreSQL driver: `jobs/server.py status`, `env`, `stop` stay light

    try:
        with psycopg.connect(admin_url, password=password, autocommit=True, connect_timeout=10) as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for db in DATABASES:
                if db not in have:
                    conn.execute(f'CREATE DATABASE "{db}"')
    except psycopg.Error as e:
        raise ServerError(admin_url, f"cannot create the databases {', '.join(DATABASES)}: {str(e).strip()}") from None


def _stop_postgres(data: Path) -> None:
    if _pg_running(data):
        _run(_as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], _pg_user()),
             f"PostgreSQL in {data}")


# ---- helpers -----------------------------------------------------------------------------------------
def _port_free(host: str, port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"{host}:{port}", f"cannot listen there ({e.strerror}): choose another {option}") from None


def _split_password(url: str) -> tuple[str, str | None]:
    """(URL without its password, the password): the password travels in PGPASSWORD, never on a command line."""
    from sqlalchemy.engine import URL, make_url  # heavy, and only `start` needs it (as psycopg above)

    try:
        u = make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises ArgumentError and friends
        raise ServerError("--database-url", f"expected a database URL such as postgresql://user:pw@host:5432/mlflow, found {url!r} ({e})") from None

    driver = "postgresql+psycopg" if u.drivername in ("postgresql", "postgres") else u.drivername  # psycopg 3
    # built anew: URL.set(password=None) keeps the password in SQLAlchemy 2.1
    bare = URL.create(driver, username=u.username, host=u.host, port=u.port, database=u.database, query=u.query)
    return bare.render_as_string(hide_password=False), u.password


def _read_state(root: Path) -> ServerInfo | None:
    path = root / STATE_FILE
    if not path.exists():
        return None
    try:
        return ServerInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ServerError(path, f"cannot be read ({e}); remove it once no server of this folder runs") from None


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _check_artifact_store(uri: str) -> None:
    """An object-store artifact destination the server can write (its AWS_* variables or instance role),
    with the client library MLflow's server needs for it; else one ServerError naming the URI, before
    anything starts (the server would otherwise fail at the first artifact a run logs)."""
    if uri.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise ServerError("--artifacts-destination", f"{uri} needs boto3 in the server's Python (pip install boto3)")
    try:
        check_writable(uri, "--artifacts-destination")
    except ConfigError as e:
        raise ServerError("--artifacts-destination", f"{e.found} (endpoint, credentials and region: the AWS_* "
                          "variables of the shell that starts the server)") from None


# ---- the commands ------------------------------------------------------------------------------------
def start(root: str | os.PathLike[str] | None = None, *, host: str = "127.0.0.1", port: int = 5000, pg_port: int = 5433,
          database_url: str | None = None, auth_database_url: str | None = None, artifacts_destination: str | None = None,
          workers: int = 2, timeout: float = 120.0) -> ServerInfo:
    """Start PostgreSQL (unless `database_url`) and the MLflow server; return what runs. Idempotent only in
    the sense that a folder whose server already runs is refused with its URI."""
    root = Path(root or default_dir()).expanduser().resolve()
    running = _read_state(root)
    if running is not None and alive(running.pid):
        raise ServerError(root, f"its server already runs at {running.uri} (pid {running.pid}); stop it with `{running.stop_command()}`")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            root.chmod(0o711)  # PostgreSQL's user passes through to postgres/; nothing here is listable
        (root / "logs").mkdir(exist_ok=True)
    except OSError as e:
        raise ServerError(root, f"cannot be created ({e.strerror})") from None
    sec = _secrets(root)
    _port_free(host, port, "--port")
    artifacts = artifacts_destination or str(root / "artifacts")
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    else:  # before PostgreSQL starts
        _check_artifact_store(artifacts)

    pg_data = None
    if database_url:
        backend, db_password = _split_password(database_url)
        db_password = db_password or os.environ.get("PGPASSWORD")
        auth_db = auth_database_url or f"sqlite:///{root / 'basic_auth.db'}"
        pg_port_used = None
    else:
        pg_data = _start_postgres(root, pg_port, sec["db_password"])
        backend, db_password = f"postgresql+psycopg://{DB_USER}@127.0.0.1:{pg_port}/mlflow", sec["db_password"]
        auth_db = auth_database_url or f"postgresql+psycopg://{DB_USER}@127.0.0.1:{pg_port}/mlflow_auth"
        pg_port_used = pg_port
    auth_db, auth_pw = _split_password(auth_db) if not auth_db.startswith("sqlite") else (auth_db, None)
    if auth_pw and auth_pw != db_password:
        raise ServerError("--auth-database-url", "its password must be the main database's (both travel as PGPASSWORD); "
                                                 "give it without a password, or use the same user")

    auth_ini = root / "basic_auth.ini"
    old = os.umask(0o077)
    try:
        write_text(auth_ini, "[mlflow]\n# written by dedn's jobs/server.py at every start\n"
                             "default_permission = READ\n"
                             f"database_uri = {auth_db}\n"
                             f"admin_username = {ADMIN}\n"
                             "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                             "# a verified password is trusted for 60 s per server worker: every request would\n"
                             "# otherwise rehash it (PBKDF2), and a training run makes thousands\n"
                             "auth_cache_ttl_seconds = 60\n")
    finally:
        os.umask(old)

    env = {
        **MLFLOW_DEFAULTS,  # the quiet logs dedn's own processes have (dedn.tracking.mlflow_settings)
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": sec["admin_password"],  # used once, when the user store is new
        "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["flask_secret"],  # CSRF key of the auth app, stable across restarts
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: 5 s to healthy instead of 11 (stack-notes)
    }
    if db_password:
        env["PGPASSWORD"] = db_password
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)  # the server is not a client of another store
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", backend,
           "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", str(workers)]
    log = root / "logs" / "mlflow.log"
    with open(log, "a") as out:
        out.write(f"\n---- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd[1:])}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=root)
    uri = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if pg_data is not None:
                _stop_postgres(pg_data)
            raise ServerError(f"mlflow server (log {log})", f"exited with {proc.returncode} while starting:\n{_log_tail(log)}")
        if http_status(f"{uri}/health", timeout=2) == 200:
            break
        time.sleep(0.1)  # one request to a port on this machine: start returns as soon as the server answers
    else:
        kill_group(proc.pid)
        if pg_data is not None:
            _stop_postgres(pg_data)
        raise ServerError(f"mlflow server (log {log})", f"not healthy after {timeout:.0f} s:\n{_log_tail(log)}")
    code = http_status(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", auth_header(ADMIN, sec["admin_password"]))
    if code != 200:
        kill_group(proc.pid)
        raise ServerError(f"mlflow server (log {log})", f"refused its own admin credentials (HTTP {code}); if the user "
                                                        f"store predates {root / SECRETS_FILE}, reset the admin password there")
    info = ServerInfo(uri=uri, host=host, port=port, pid=proc.pid, data_dir=str(root), artifacts_destination=artifacts,
                      backend=backend, pg_data=str(pg_data) if pg_data else None, pg_port=pg_port_used, started=time.time())
    write_text(root / STATE_FILE, json.dumps(asdict(info), indent=2))
    return info


def stop(root: str | os.PathLike[str] | None = None) -> ServerInfo | None:
    """Stop the MLflow server and the PostgreSQL cluster of folder `root`; what was running (None: nothing)."""
    root = Path(root or default_dir()).expanduser().resolve()
    info = _read_state(root)
    if info is None:
        _, data, _ = _pg_paths(root)
        if _pg_running(data):  # a start that failed half-way
            _stop_postgres(data)
        return None
    kill_group(info.pid)
    if info.pg_data:
        _stop_postgres(Path(info.pg_data))
    (root / STATE_FILE).unlink(missing_ok=True)
    return info


def status(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What runs for folder `root`: the recorded server, whether it answers, its memory."""
    root = Path(root or default_dir()).expanduser().resolve()
    info = _read_state(root)
    if info is None:
        return {"data_dir": str(root), "running": False}
    up = alive(info.pid)
    healthy = up and http_status(f"{info.uri}/health") == 200
    out: dict[str, Any] = {**asdict(info), "running": up, "healthy": healthy}
    if up:
        out["memory_mib"] = server_memory_mib(info)
    return out


def env_lines(root: str | os.PathLike[str] | None = None) -> list[str]:
    """`export` lines that point a shell's jobs at the team server (for `eval "$(...)"`)."""
    root = Path(root or default_dir()).expanduser().resolve()
    info = _read_state(root)
    if info is None:
        raise ServerError(root, "no server of this folder runs (start it with `python jobs/server.py start`)")
    sec = _secrets(root)
    return [f"export MLFLOW_TRACKING_URI={shlex.quote(info.uri)}", f"export MLFLOW_TRACKING_USERNAME={ADMIN}",
            f"export MLFLOW_TRACKING_PASSWORD={shlex.quote(sec['admin_password'])}"]


def server_memory_mib(info: ServerInfo) -> dict[str, float]:
    """Resident memory (MiB) of the MLflow server's process group and of the PostgreSQL cluster's processes."""
    def rss(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0.0

    out = {"mlflow": round(sum(rss(p) for p in [info.pid, *descendants(info.pid)]), 1)}
    if info.pg_data:
        try:
            pg = int((Path(info.pg_data) / "postmaster.pid").read_text().split()[0])
            out["postgres"] = round(sum(rss(p) for p in [pg, *descendants(pg)]), 1)
        except (OSError, ValueError, IndexError):
            pass
    return out


def backup(root: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str]) -> list[Path]:
    """pg_dump (custom format) of both databases and, for a local artifact store, a tar.gz of it."""
    root = Path(root or default_dir()).expanduser().resolve()
    info = _read_state(root)
    if info is None or not info.pg_port:
        raise ServerError(root, "backup needs the managed PostgreSQL of a running server (for an external "
                                "database use its own pg_dump)")
    sec = _secrets(root)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    written = []
    for db in DATABASES:
        target = out / f"{db}-{stamp}.dump"
        tmp = target.with_name(f".{target.name}.tmp")
        _run([_pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(info.pg_port), "-U", DB_USER, "-Fc", "-f", str(tmp), db],
             f"pg_dump of {db}", env={"PGPASSWORD": sec["db_password"]}, timeout=3600)
        os.replace(tmp, target)
        written.append(target)
    if "://" not in info.artifacts_destination:
        target = out / f"artifacts-{stamp}.tar.gz"
        tmp = target.with_name(f".{target.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(info.artifacts_destination, arcname="artifacts")
        os.replace(tmp, target)
        written.append(target)
    return written
