"""The lifecycle flow as a scheduled Prefect deployment, served from this process.

    make serve                                  # a Prefect server on 127.0.0.1:4200 + the nightly deployment
    python -m flows.deploy --cron "0 3 * * *"   # serve against PREFECT_API_URL (a server you run)
    python -m flows.deploy --start-server --port 4200 --params profiles/micro.yaml

The deployment is `lmcore-lifecycle/<name>` (default `scheduled`): a cron schedule, the flow's parameters
(params file and project root, stored with the deployment) and at most one run at a time, since runs of one
deployment share their output folders. A run due while a manual run works in the root waits for it (`--wait`,
an hour by default), then runs only what is still changed. Trigger one now with

    prefect deployment run lmcore-lifecycle/scheduled

Runs execute in subprocesses of this one, so MLFLOW_TRACKING_URI and the other settings of this shell
apply to them. Schedules need a real Prefect server: the ephemeral one that `lmcore pipeline` starts
cannot schedule. For a work pool (process, Dask, Ray, Kubernetes workers) use `prefect deploy` with the
entrypoint `flows/lifecycle.py:lifecycle` instead; docs/operations.md shows both.

The server `--start-server` starts takes state-changing requests only with a CSRF token and grants CORS to its own
origin only, http://127.0.0.1:<port> (`server_settings`): a web page open in a browser on this machine cannot
create, change or run deployments. Prefect's client fetches the token by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DEFAULT_CRON = "0 3 * * *"  # nightly, 03:00 in --timezone
DEFAULT_NAME = "scheduled"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=DEFAULT_NAME, help="deployment name (lmcore-lifecycle/<name>)")
    p.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (default: %(default)s)")
    p.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default: %(default)s)")
    p.add_argument("--params", default="params.yaml", help="params file the runs use (default: %(default)s)")
    p.add_argument("--root", default=".", help="project root the runs write under (default: the current folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a params override for every run, e.g. pretrain.max_steps=50 (repeatable)")
    p.add_argument("--wait", type=float, default=3600, metavar="SECONDS",
                   help="how long a run waits for another lmcore run working in the root, e.g. a manual one, before "
                        "it fails (default: %(default)s)")
    p.add_argument("--paused", action="store_true", help="create the schedule paused (runs only when triggered)")
    p.add_argument("--start-server", action="store_true",
                   help="start a Prefect server on 127.0.0.1:--port first (CSRF protection on, CORS for its own origin "
                        "only), unless one answers there")
    p.add_argument("--port", type=int, default=4200, help="port of the server --start-server starts (default: %(default)s)")
    return p.parse_args(argv)


def server_settings(port: int) -> dict[str, str]:
    """The Prefect settings (environment variables) of the server on 127.0.0.1:port: CSRF protection on, and CORS
    answers for its own origin only (the UI it serves there), not Prefect's default `*`."""
    return {
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}",
    }


def server_command(port: int) -> list[str]:
    """`prefect server start` on 127.0.0.1:port, with this interpreter's prefect."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def _csrf_enabled(api_url: str) -> bool:
    """Whether the server at api_url asks for CSRF tokens (its token endpoint answers 422 when it does not)."""
    try:
        with urllib.request.urlopen(f"{api_url}/csrf-token?client=lmcore-deploy-probe", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def local_server(port: int, timeout: float = 180) -> Iterator[str]:
    """A `prefect server start` on 127.0.0.1:port with `server_settings` for the life of the block (or the one
    already there, with a warning when it takes requests without a CSRF token)."""
    api_url = f"http://127.0.0.1:{port}/api"
    if _healthy(api_url):
        print(f"using the Prefect server already at {api_url}", flush=True)
        if not _csrf_enabled(api_url):
            print(f"warning: the Prefect server at {api_url} has CSRF protection off: any web page open in a browser on "
                  "this machine can drive it; start it with PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED=true", flush=True)
        yield api_url
        return
    cmd = server_command(port)
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **server_settings(port)}
    # Its own session: Ctrl-C reaches only this process, which pauses the schedule while the server is still up.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if proc.poll() is not None:
                raise SystemExit(f"prefect server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"prefect server did not answer at {api_url} in {timeout:.0f} s")
            time.sleep(0.5)
        print(f"Prefect server on http://127.0.0.1:{port} (UI and API)", flush=True)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve(args: argparse.Namespace) -> None:
    """Register the deployment and serve it until interrupted (the schedule is paused on shutdown)."""
    from prefect.client.schemas.schedules import CronSchedule

    from flows.lifecycle import lifecycle
    from lmcore.config import load_params

    root = Path(args.root).resolve()
    params_file = Path(args.params)
    params_file = params_file if params_file.is_absolute() else root / params_file
    load_params(params_file, overrides=args.overrides)  # fail here, not at 3 am
    lifecycle.serve(
        name=args.name,
        schedule=CronSchedule(cron=args.cron, timezone=args.timezone),
        parameters={"params_file": str(params_file), "root": str(root), "overrides": args.overrides or None, "wait_s": args.wait},
        paused=args.paused,
        global_limit=1,
        tags=["lmcore"],
        description=f"The lmcore lifecycle on {params_file.name}, cron '{args.cron}' ({args.timezone}), writing under {root}",
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.start_server:
        if not os.environ.get("PREFECT_API_URL"):
            raise SystemExit(
                "schedules need a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) or pass --start-server"
            )
        serve(args)
        return
    with local_server(args.port) as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # read by prefect at import, and by the runs' subprocesses
        serve(args)


if __name__ == "__main__":
    main()
