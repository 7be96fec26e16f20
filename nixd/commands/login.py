"""``nixd login METHOD`` and ``nixd logout``: change the machine's login, via the daemon.

Each method gathers what proves the identity *here*, in the CLI's environment, and sends
it to the daemon over the control socket as ``{"method", "server", "params"}``; secrets
are read from files, stdin or environment variables, never from the command line, where
``ps`` would show them. The daemon exchanges, pins the server's keys, sets up Nix and
keeps the token fresh (see :mod:`nixd.auth.methods`).

- ``token``: an API token from a file or stdin.
- ``github-action``: ``ACTIONS_ID_TOKEN_REQUEST_URL``/``_TOKEN`` of the running job.
- ``gitlab-pipeline``: the job's ``id_tokens`` variable (``NIXD_ID_TOKEN``) or a file.
- ``aws``: nothing secret at all: the daemon uses its own AWS credential chain.
- no method: interactive login (a device code approved in a browser, :mod:`nixd.auth.device`);
  the CLI runs the flow itself and hands the resulting refresh credential to the daemon.
  It first asks the daemon (``GET /login``) whether this user may log in at all, so a user
  who may not is told so before a browser is involved.

A login succeeds only when Nix will use it: when the daemon could not bring its settings
into effect (nix.conf managed elsewhere and not including nixd's fragment, a file it could
not write, ...), the login is kept but the command prints what to do and exits
:data:`EXIT_NIX_NOT_CONFIGURED`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from nixd import exitcodes
from nixd.auth.github_action import TOKEN_VAR, URL_VAR
from nixd.auth.gitlab_pipeline import DEFAULT_VARIABLE
from nixd.auth.token import read_api_token
from nixd.commands._common import add_daemon_options
from nixd.daemon.client import DaemonRefused, call, socket_path
from nixd.daemon.config import DEFAULT_CONFIG_PATH, load_config
from nixd.errors import ConfigError, LoginFailed

EXIT_NIX_NOT_CONFIGURED = exitcodes.FAILURE
"""Logged in, but Nix does not use nixd's settings yet (the message says what to do)."""


def _method(
    methods: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    p = methods.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--server", metavar="URL", help="the nixd server (default from the config)")
    add_daemon_options(p)
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = sub.add_parser("login", help="log this machine in (needs root or the nixd group)")
    # No METHOD: interactive login (device code, approved in a browser).
    login.add_argument("--server", metavar="URL", help="the nixd server (default from the config)")
    add_daemon_options(login)
    login.set_defaults(func=run_login_interactive)
    methods = login.add_subparsers(dest="method", metavar="METHOD", required=False)

    token = _method(methods, "token", "log in with an API token (from a file or stdin)")
    token.add_argument(
        "--token-file", metavar="FILE", help="read the API token from FILE (default: stdin)"
    )
    token.set_defaults(func=run_login_token)

    github = _method(
        methods,
        "github-action",
        "log in as this GitHub Actions job (needs `permissions: id-token: write`); "
        "renewed with new ID tokens while the job runs",
    )
    github.add_argument(
        "--audience",
        help="the `aud` to request; must match the server's [[github]] audience "
        "(default: the server URL, e.g. https://cache.example.com)",
    )
    github.set_defaults(func=run_login_github)

    gitlab = _method(
        methods,
        "gitlab-pipeline",
        "log in as this GitLab CI job with its ID token (declare it in .gitlab-ci.yml: "
        f"`id_tokens: {{{DEFAULT_VARIABLE}: {{aud: <server URL>}}}}`); "
        "valid until the ID token expires",
    )
    gitlab.add_argument(
        "--variable",
        default=DEFAULT_VARIABLE,
        help=f"the environment variable holding the ID token (default: {DEFAULT_VARIABLE})",
    )
    gitlab.add_argument(
        "--token-file", metavar="FILE", help="read the ID token from FILE (or - for stdin)"
    )
    gitlab.set_defaults(func=run_login_gitlab)

    aws = _method(
        methods,
        "aws",
        "log in as the AWS principal of the nixd *daemon* (its environment, profile, "
        "container or instance credentials); re-signed at each renewal",
    )
    aws.add_argument("--profile", help="the AWS profile the daemon uses (default: its chain)")
    aws.add_argument("--region", help="the STS region (default: the daemon's, or us-east-1)")
    aws.add_argument("--sts-endpoint", dest="endpoint", metavar="URL", help="the STS endpoint URL")
    aws.add_argument(
        "--audience",
        help="the audience header to sign; must match the server's [[aws]] audience "
        "(default: the server URL)",
    )
    aws.set_defaults(func=run_login_aws)

    logout = sub.add_parser("logout", help="log out and remove what nixd added to Nix's config")
    add_daemon_options(logout)
    logout.set_defaults(func=run_logout)


def _login(args: argparse.Namespace, method: str, params: dict[str, Any]) -> int:
    body = {"method": method, "server": args.server, "params": params}
    answer = call(
        socket_path(args.socket, args.config), "POST", "/login", body, config_arg=args.config
    )
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(answer["token_expires_at"]))
    print(f"logged in as {answer['identity']} at {answer['server']} (token valid until {expires})")
    if answer.get("renewal"):
        print(f"renewal: {answer['renewal']}")
    if answer.get("warning"):
        print(f"warning: {answer['warning']}", file=sys.stderr)
    nix = answer.get("nix")
    if isinstance(nix, dict) and nix.get("in_effect") is False:
        print(
            f"nixd: error: logged in, but Nix does not use nixd yet: {nix.get('problem')}",
            file=sys.stderr,
        )
        return EXIT_NIX_NOT_CONFIGURED
    return 0


def check_may_login(args: argparse.Namespace) -> None:
    """Raise unless the daemon would accept a login from this user (before a browser flow).

    A daemon too old to know ``GET /login`` (404/405) is not asked: its ``POST /login``
    still decides.
    """
    try:
        call(socket_path(args.socket, args.config), "GET", "/login", config_arg=args.config)
    except DaemonRefused as exc:
        if exc.status in (404, 405):
            return
        raise


def run_login_token(args: argparse.Namespace) -> int:
    return _login(args, "token", {"token": read_api_token(args.token_file)})


def github_action_params(audience: str | None) -> dict[str, Any]:
    """The ``github-action`` login params from this process's environment (the running job).

    Shared by ``nixd login github-action`` (which hands them to the daemon) and ``nixd
    publish`` (which exchanges them itself).
    """
    url, token = os.environ.get(URL_VAR), os.environ.get(TOKEN_VAR)
    if not url or not token:
        raise LoginFailed(
            f"{URL_VAR} and {TOKEN_VAR} are not set: run this in a GitHub Actions job with "
            "`permissions: id-token: write` (and `sudo -E` to keep the environment)"
        )
    return {"request_url": url, "request_token": token, "audience": audience}


def gitlab_pipeline_params(variable: str, token_file: str | None) -> dict[str, Any]:
    """The ``gitlab-pipeline`` login params: the job's ID token from ``token_file`` (``-``:
    stdin) or the environment variable ``variable`` (as :func:`github_action_params`)."""
    if token_file:
        try:
            if token_file == "-":  # noqa: S105 - stdin, not a password
                text = sys.stdin.read()
            else:
                with open(token_file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as exc:
            raise LoginFailed(f"cannot read the ID token from {token_file}: {exc}") from exc
        where = token_file
    else:
        text = os.environ.get(variable, "")
        where = f"${variable}"
    token = text.strip()
    if not token:
        raise LoginFailed(
            f"no ID token in {where}: declare it in .gitlab-ci.yml as `id_tokens: "
            f"{{{variable}: {{aud: <the server's audience>}}}}`"
        )
    return {"id_token": token}


def run_login_github(args: argparse.Namespace) -> int:
    return _login(args, "github-action", github_action_params(args.audience))


def run_login_gitlab(args: argparse.Namespace) -> int:
    return _login(args, "gitlab-pipeline", gitlab_pipeline_params(args.variable, args.token_file))


def run_login_aws(args: argparse.Namespace) -> int:
    params = {
        "profile": args.profile,
        "region": args.region,
        "endpoint": args.endpoint,
        "audience": args.audience,
    }
    return _login(args, "aws", {k: v for k, v in params.items() if v})


def run_login_interactive(args: argparse.Namespace) -> int:
    """``nixd login``: show a code, wait for its approval in a browser, hand over to the daemon."""
    from nixd.auth.device import interactive_login  # noqa: PLC0415 - only this command needs it

    server = args.server or server_url(args.config)
    check_may_login(args)
    refresh = interactive_login(server)
    args.server = server
    return _login(args, "device", {"refresh_token": refresh})


def server_url(config_arg: str | None) -> str:
    """The server of the daemon's config, for commands that talk to it themselves."""
    config = load_config(config_arg or DEFAULT_CONFIG_PATH, missing_ok=True)
    if not config.server.url:
        raise ConfigError("no server URL: pass --server or set server.url in the daemon config")
    return config.server.url.rstrip("/")


def run_logout(args: argparse.Namespace) -> int:
    answer = call(
        socket_path(args.socket, args.config), "POST", "/logout", {}, config_arg=args.config
    )
    who = answer.get("logged_out")
    print(f"logged out {who}" if who else "was not logged in")
    return 0
