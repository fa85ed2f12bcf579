"""Team mode: start, inspect, connect to, back up and stop an MLflow tracking server on PostgreSQL.

    python jobs/server.py start [--data-dir DIR] [--port 5000] [--artifacts-destination PATH_OR_URI]
    eval "$(python jobs/server.py env)"        # this shell's jobs now log to the server
    python jobs/train.py --data DIR ...         # unchanged: MLFLOW_TRACKING_URI points it there
    python jobs/server.py status
    python jobs/server.py backup --out backups/
    python jobs/server.py stop

`start` initialises a PostgreSQL cluster under DIR/postgres (or uses --database-url), then runs
`mlflow server` with basic authentication and proxied artifacts (DIR/artifacts by default), bound
to 127.0.0.1 unless --host says otherwise. Passwords are generated once into DIR/secrets.json
(mode 0600). Stopping and starting again keeps every run and model. DIR defaults to
$DEDN_HOME/team (/var/lib/dedn-team for root: PostgreSQL then runs as the `postgres` user).
"""
from __future__ import annotations

import argparse
import json
import sys

from dedn.cli import HelpFormatter, command
from dedn.errors import DednError
from dedn.tracking import server


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{start,stop,status,env,backup}")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        s.add_argument("--data-dir", default=None,
                       help="the server's folder: PostgreSQL data, artifacts, secrets, logs "
                            "(default: $DEDN_HOME/team; /var/lib/dedn-team for root)")
        return s

    s = cmd("start", "start PostgreSQL and the MLflow server (basic auth, proxied artifacts); print how to connect and stop")
    s.add_argument("--host", default="127.0.0.1", help="address the MLflow server listens on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    s.add_argument("--pg-port", type=int, default=5433, help="the managed PostgreSQL's port (on 127.0.0.1 only)")
    s.add_argument("--database-url", default=None,
                   help="an existing PostgreSQL database (postgresql://user:pw@host:5432/mlflow) instead of a managed one")
    s.add_argument("--auth-database-url", default=None,
                   help="MLflow's user store (default: a second managed database, or DIR/basic_auth.db with --database-url)")
    s.add_argument("--artifacts-destination", default=None,
                   help="where the server stores artifacts: a path or s3://bucket/prefix (AWS_* variables; default: DIR/artifacts)")
    s.add_argument("--workers", type=int, default=2, help="MLflow server worker processes")
    cmd("stop", "stop the MLflow server and the managed PostgreSQL")
    cmd("status", "say whether the server runs and answers, and its memory")
    cmd("env", "print export lines for MLFLOW_TRACKING_URI and the credentials (use: eval \"$(... env)\")")
    s = cmd("backup", "pg_dump both databases and archive a local artifact store")
    s.add_argument("--out", required=True, help="folder for the dumps and the artifact archive")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    try:
        if args.command == "start":
            info = server.start(args.data_dir, host=args.host, port=args.port, pg_port=args.pg_port,
                                database_url=args.database_url, auth_database_url=args.auth_database_url,
                                artifacts_destination=args.artifacts_destination, workers=args.workers)
            mem = server.server_memory_mib(info)
            print(f"MLflow server: {info.uri} (pid {info.pid}; {', '.join(f'{k} {v:.0f} MiB' for k, v in mem.items())})")
            print(f"  database:  {info.backend}" + (f" (PostgreSQL data in {info.pg_data})" if info.pg_data else ""))
            print(f"  artifacts: {info.artifacts_destination} (clients go through the server)")
            print(f"  logs:      {info.data_dir}/logs/mlflow.log")
            print(f"connect:  eval \"$({command('jobs/server.py', 'env', '--data-dir', info.data_dir)})\"")
            print(f"browse:   {info.uri} (user admin, password in {info.data_dir}/secrets.json)")
            print(f"stop:     {info.stop_command()}")
        elif args.command == "stop":
            info = server.stop(args.data_dir)
            print("nothing was running" if info is None else f"stopped the MLflow server at {info.uri}"
                  + (" and PostgreSQL" if info.pg_data else ""))
        elif args.command == "status":
            st = server.status(args.data_dir)
            print(json.dumps(st, indent=2, default=str))
            return 0 if st.get("healthy") else 1
        elif args.command == "env":
            print("\n".join(server.env_lines(args.data_dir)))
        elif args.command == "backup":
            for path in server.backup(args.data_dir, args.out):
                print(f"wrote {path}")
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
