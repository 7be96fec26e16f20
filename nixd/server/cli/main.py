"""``nixd-server``: set up, run and administer an identity-aware Nix binary cache.

Thin: parse, call the server modules, print. Errors nixd raises on purpose print as one
line on stderr (exit 1), never as a traceback. Every admin change is written to the audit
log as well, under the identity ``admin:<user>`` of whoever ran the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import ipaddress
import json
import logging
import re
import socket
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nixd import __version__, systemd
from nixd.cliutil import run_command
from nixd.errors import ConfigError
from nixd.server.access.audit import HEAD_SUFFIX, VerifyResult, verify
from nixd.server.access.audit_db import export as export_database
from nixd.server.access.audit_db import export_file, open_audit, open_private, verify_database
from nixd.server.access.credentials import CredentialStore
from nixd.server.access.deploy import DEPLOY_ONLY, is_deploy_only
from nixd.server.access.identity import KINDS, Identity
from nixd.server.access.keys import ServerKeys
from nixd.server.access.policy import Decision, load_policy
from nixd.server.access.shared_policy import policy_in_force
from nixd.server.cli.flakes import register as register_flake_cli
from nixd.server.cli.gc import register as register_gc
from nixd.server.cli.migrate import register as register_migrate
from nixd.server.cli.mirror import register as register_mirror
from nixd.server.cli.policies import register as register_policy_cli
from nixd.server.cli.users import register_cli as register_user_cli
from nixd.server.cli.views import register as register_view_cli
from nixd.server.config import CONFIG_NAME, ServerConfig, render_default
from nixd.server.storage.blobs import open_blob_store
from nixd.server.storage.db import (
    create_org,
    create_project,
    get_org,
    get_project,
    list_projects,
    note_key_change,
    open_db,
    set_project_public,
    split_slice,
)
from nixd.server.storage.sql import is_postgres
from nixd.server.storage.store import Store

PROG = "nixd-server"
_DURATION = re.compile(r"(\d+)([smhdwy]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
ACTIONS = ("cache:read", "cache:write", "cache:admin", "flake:read", "flake:publish", "deploy:read")


def default_policy(org: str) -> str:
    """The policy ``init`` writes: a sensible start for one organization."""
    return textwrap.dedent(
        f"""\
        # nixd-server access policy, reloaded on change; a broken file is refused and the
        # previous policy stays in force. Deny beats allow; no matching rule means deny.
        # API tokens are identities "token:ORG/NAME" with attributes org (the token's
        # organization), name, credential (its id) and whatever `token create --attr K=V`
        # set. Projects created with `project create --public` are readable by anyone
        # (an allow rule "public-project" that any matching deny overrides); so are the
        # slices listed here:
        #
        # [public]
        # resources = ["{org}/oss-*"]

        [[rule]]
        id = "{org}-admins"
        description = "admin tokens may do everything in their organization"
        effect = "allow"
        subjects = [{{ kind = "token", org = "{org}", role = "admin" }}]
        actions = ["*"]
        resources = ["{org}/*"]

        [[rule]]
        id = "{org}-members"
        description = "tokens of the organization read and write its projects, read its flakes"
        effect = "allow"
        subjects = [{{ kind = "token", org = "{org}" }}]
        actions = ["cache:read", "cache:write", "flake:read"]
        resources = ["{org}/*"]

        # Private flakes are published only from CI: the GitHub Actions and GitLab CI
        # identities of the repositories configured for {org} ([[github]]/[[gitlab]] in
        # config.toml give them org = "{org}"; others get no token). Match immutable ids
        # (repository_id, project_id) to narrow it to some repositories.
        [[rule]]
        id = "{org}-ci-publish"
        description = "the organization's CI publishes and reads its flakes"
        effect = "allow"
        subjects = [{{ kind = ["github", "gitlab"], org = "{org}" }}]
        actions = ["flake:publish", "flake:read"]
        resources = ["{org}/*"]

        [[rule]]
        id = "no-publish-outside-ci"
        description = "API tokens, people and machines never publish flakes"
        effect = "deny"
        subjects = [{{ kind = ["token", "user", "aws"] }}]
        actions = ["flake:publish"]
        resources = ["*"]

        [[rule]]
        id = "{org}-readers-read-only"
        description = "tokens created with --attr role=reader never upload"
        effect = "deny"
        subjects = [{{ kind = "token", org = "{org}", role = "reader" }}]
        actions = ["cache:write", "cache:admin", "flake:publish"]
        resources = ["*"]
        """
    )


# -- helpers -------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90``, ``15m``, ``12h``, ``30d``, ``1y`` into seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"--expires {text!r}: use a positive number with s, m, h, d, w or y")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def parse_attrs(pairs: Sequence[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--attr {pair!r}: expected KEY=VALUE")
        attrs[key] = value
    return attrs


def deploy_grants(outputs: Sequence[str], versions: Sequence[str]) -> list[str]:
    """``--deploy ORG/FLAKE#OUTPUT`` (repeatable) with ``--deploy-version CONSTRAINT``: one
    constraint for all, or one per ``--deploy`` in order; a grant may carry ``@C`` itself."""
    if versions and not outputs:
        raise ConfigError("--deploy-version needs --deploy ORG/FLAKE#OUTPUT")
    if len(versions) not in (0, 1, len(outputs)):
        raise ConfigError("give one --deploy-version for all --deploy, or one for each")
    grants = []
    for i, output in enumerate(outputs):
        version = versions[0] if len(versions) == 1 else versions[i] if versions else ""
        if version and "@" in output:
            raise ConfigError(f"--deploy {output!r} has a constraint and --deploy-version too")
        grants.append(f"{output}@{version}" if version else output)
    return grants


def _admin_identity() -> Identity:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Identity("user", f"{user}@{socket.gethostname()}", {"via": "nixd-server"})


def _audit(config: ServerConfig, action: str, resource: str, **extra: Any) -> None:
    event = {
        "request_id": f"cli-{int(time.time() * 1000)}",
        "identity": _admin_identity().render(),
        "action": action,
        "resource": resource,
        "decision": "allow",
        "rule": "local-admin",
        "source": "local",
        **extra,
    }

    with open_audit(config) as audit:
        audit.record(event)


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


# -- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    if (state / CONFIG_NAME).exists():
        raise ConfigError(f"{state / CONFIG_NAME}: already initialized")
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    (state / CONFIG_NAME).write_text(render_default(args.listen, database=args.database))
    config = ServerConfig.load(state)
    policy_text = default_policy(args.org)
    load_policy_text(policy_text, str(config.policy_path))
    config.policy_path.write_text(policy_text)
    key_name = args.key_name or f"{args.org}-cache-1"
    conn = open_db(config.database)
    try:
        keys = ServerKeys.init(state, key_name, conn=conn)
        Store.open(conn, open_blob_store(config), sweep=False)
        create_org(conn, args.org)
        _, token = CredentialStore(conn).create(args.org, "admin", attributes={"role": "admin"})
    finally:
        conn.close()
    _audit(config, "admin:init", f"{args.org}/*", org=args.org)
    print(f"initialized {state}")
    print(f"  organization:        {args.org}")
    print(f"  narinfo public key:  {keys.narinfo.current.public().render()}")
    print(f"  config:              {state / CONFIG_NAME}")
    print(f"  policy:              {config.policy_path}")
    print()
    print("admin API token (shown once, store it now):")
    print(f"  {token}")
    return 0


def load_policy_text(text: str, source: str) -> None:
    """Refuse a broken default policy before writing it (a bug here, not user input)."""
    tmp = Path(source).with_name(".policy-check.toml")
    tmp.write_text(text)
    try:
        load_policy(tmp)
    finally:
        tmp.unlink()


def cmd_serve(args: argparse.Namespace) -> int:
    from nixd.server.http.serve import run  # noqa: PLC0415 - only serve needs the HTTP front

    config = ServerConfig.load(args.state_dir)
    journal = systemd.journald_handler()
    if journal is not None:  # under systemd: lines keep their priority in the journal
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(journal)
    run(config, listen=args.listen or None, workers=args.workers or 0)
    return 0


def _open(args: argparse.Namespace) -> tuple[ServerConfig, Any]:
    config = ServerConfig.load(args.state_dir)
    conn = open_db(config.database)
    Store.open(conn, open_blob_store(config), sweep=False)
    return config, conn


def cmd_token_create(args: argparse.Namespace) -> int:
    config, conn = _open(args)
    try:
        expires = parse_duration(args.expires) if args.expires else None
        attributes: dict[str, Any] = dict(parse_attrs(args.attr))
        grants = deploy_grants(args.deploy, args.deploy_version)
        if grants:
            attributes["deploy"] = grants
        record, token = CredentialStore(conn).create(
            args.org, args.name, attributes=attributes, expires_in=expires
        )
    finally:
        conn.close()
    _audit(config, "admin:token.create", f"{record.org}/*", credential=record.id, name=record.name)
    if args.json:
        print(
            json.dumps(
                {
                    "id": record.id,
                    "org": record.org,
                    "name": record.name,
                    "token": token,
                    "attributes": dict(record.attributes),
                    "expires": record.expires,
                }
            )
        )
    else:
        print(
            f"created API token {record.id} ({record.org}/{record.name}), "
            f"expires {_fmt_time(record.expires)}; shown once:"
        )
        print(token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    _, conn = _open(args)
    try:
        records = CredentialStore(conn).list(args.org, include_revoked=args.all)
    finally:
        conn.close()
    now = time.time()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "org": r.org,
                        "name": r.name,
                        "state": r.state(now),
                        "attributes": dict(r.attributes),
                        "created": r.created,
                        "expires": r.expires,
                        "revoked_at": r.revoked_at,
                        "last_used": r.last_used,
                    }
                    for r in records
                ]
            )
        )
        return 0
    print(f"{'ID':16}  {'ORG/NAME':28}  {'STATE':8}  {'EXPIRES':20}  {'LAST USED':20}  ATTRS")
    for r in records:
        attrs = ",".join(f"{k}={v}" for k, v in sorted(r.attributes.items()))
        print(
            f"{r.id:16}  {r.org + '/' + r.name:28}  {r.state(now):8}  "
            f"{_fmt_time(r.expires):20}  {_fmt_time(r.last_used):20}  {attrs}"
        )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    config, conn = _open(args)
    try:
        store = CredentialStore(conn)
        ident = args.credential
        if "/" in ident:
            org, _, name = ident.partition("/")
            found = store.find(org, name)
            if found is None:
                raise ConfigError(f"no live credential {ident!r}")
            ident = found.id
        record = store.revoke(ident)
    finally:
        conn.close()
    _audit(config, "admin:token.revoke", f"{record.org}/*", credential=record.id)
    print(f"revoked {record.id} ({record.org}/{record.name})")
    return 0


def cmd_org_create(args: argparse.Namespace) -> int:
    config, conn = _open(args)
    try:
        create_org(conn, args.org)
    finally:
        conn.close()
    _audit(config, "admin:org.create", f"{args.org}/*")
    print(f"created organization {args.org}")
    return 0


def cmd_project_create(args: argparse.Namespace) -> int:
    org, name = split_slice(args.project)
    config, conn = _open(args)
    try:
        if get_project(conn, org, name) is not None:
            project = set_project_public(conn, org, name, args.public)
            verb = "updated"
        else:
            if get_org(conn, org) is None:
                raise ConfigError(
                    f"organization {org!r} does not exist; create it with "
                    f"`{PROG} org create {args.state_dir} {org}`"
                )
            project = create_project(conn, org, name, public=args.public)
            verb = "created"
    finally:
        conn.close()
    _audit(config, f"admin:project.{verb[:-1]}", project.slice, public=project.public)
    url_hint = f"/cache/{project.slice}"
    print(
        f"{verb} project {project.slice} ({'public' if project.public else 'private'}); "
        f"upload URL: http://HOST:PORT{url_hint}"
    )
    return 0


def cmd_project_list(args: argparse.Namespace) -> int:
    _, conn = _open(args)
    try:
        projects = list_projects(conn, args.org)
    finally:
        conn.close()
    for p in projects:
        print(f"{p.slice}\t{'public' if p.public else 'private'}\tpriority {p.priority}")
    return 0


def _is_public(config: ServerConfig, resource: str) -> bool:
    """Whether ``resource`` names an existing project with the ``--public`` flag.

    ``policy explain`` must decide exactly as the server does, and the server counts that
    flag as an allow rule (:data:`~nixd.server.access.policy.PUBLIC_PROJECT_RULE`).
    """
    try:
        org, name = split_slice(resource)
    except ConfigError:
        return False  # a glob or a bare org names no project
    if not isinstance(config.database, str) and not config.database_path.exists():
        return False
    conn = open_db(config.database)
    try:
        project = get_project(conn, org, name)
    finally:
        conn.close()
    return project is not None and project.public


def cmd_policy_explain(args: argparse.Namespace) -> int:
    config = ServerConfig.load(args.state_dir)
    kind, sep, subject = args.identity.partition(":")
    if not sep or kind not in KINDS or not subject:
        raise ConfigError(
            f"--identity {args.identity!r}: expected KIND:SUBJECT, KIND one of "
            f"{', '.join(sorted(KINDS))}"
        )
    if args.source_ip:
        try:
            ipaddress.ip_address(args.source_ip)
        except ValueError as exc:
            raise ConfigError(f"--source-ip {args.source_ip!r}: {exc}") from exc
    identity = Identity(kind, subject, parse_attrs(args.attr))
    conn = open_db(config.database)
    try:
        policy, _ = policy_in_force(config.policy_path, conn)
    finally:
        conn.close()
    source_ip = args.source_ip or None
    public = _is_public(config, args.resource)
    decision = policy.decide(identity, args.action, args.resource, source_ip, public=public)
    deploy_only = args.action != "deploy:read" and is_deploy_only(identity)
    if deploy_only:  # as the server decides it (nixd.server.access.deploy)
        decision = Decision(
            False, DEPLOY_ONLY, "a deploy-only token reads its deploy grants' closures only"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "identity": identity.render(),
                    "attributes": dict(identity.attributes),
                    "action": args.action,
                    "resource": args.resource,
                    "source_ip": source_ip,
                    "decision": decision.effect,
                    "rule": decision.rule,
                    "reason": decision.reason,
                }
            )
        )
    elif deploy_only:
        print(f"deny {args.action} on {args.resource} (rule {DEPLOY_ONLY}): {decision.reason}")
    else:
        print(
            policy.explain(identity, args.action, args.resource, source_ip, public=public), end=""
        )
    return 0 if decision.allowed else 2


def _audit_source(args: argparse.Namespace) -> tuple[str, Path | None]:
    """Which log an ``audit`` command reads: (what to call it, the file or None = the DB)."""
    if args.file:
        return args.file, Path(args.file)
    config = ServerConfig.load(args.state_dir)
    if is_postgres(config.database):
        return str(config.database).split("?", 1)[0], None
    return str(config.audit_path), config.audit_path


def _verify_report(where: str, result: VerifyResult, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"log": where, **dataclasses.asdict(result)}))
    else:
        print(f"{where}: {result.describe()}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 2


def cmd_audit_verify(args: argparse.Namespace) -> int:
    where, path = _audit_source(args)
    if path is None:
        url = str(ServerConfig.load(args.state_dir).database)
        return _verify_report(where, verify_database(url), args.json)
    return _verify_report(where, verify(path), args.json)


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Write the chain in the file format (to stdout, or ``--output`` with its head file)."""
    where, path = _audit_source(args)
    out = Path(args.output) if args.output and args.output != "-" else None
    if path is None:
        url = str(ServerConfig.load(args.state_dir).database)
        if out is not None:
            result = export_file(url, out)
        else:
            result, _ = export_database(url, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    else:
        result = verify(path)
        _copy_complete_lines(path, out)
    if not result.ok or args.json:
        # stdout may be the export itself: the verdict goes to stderr
        report = json.dumps({"log": where, **dataclasses.asdict(result)}) if args.json else None
        print(report or f"{where}: {result.describe()}", file=sys.stderr)
    return 0 if result.ok else 2


def _copy_complete_lines(path: Path, out: Path | None) -> None:
    """The audit file's complete lines (a torn tail left out) to ``out`` or stdout, and
    its head file next to ``out``.

    The head is read before the lines, as :func:`~nixd.server.access.audit.verify` does:
    a server appending meanwhile makes the copy's head lag (which verifies), never claim
    a line the copy lacks.
    """
    head = Path(f"{path}{HEAD_SUFFIX}")
    try:
        head_bytes = head.read_bytes() if head.exists() else None
        with path.open("rb") as src:
            if out is None:
                for raw in src:
                    if raw.endswith(b"\n"):
                        sys.stdout.buffer.write(raw)
                sys.stdout.buffer.flush()
                return
            tmp = out.with_name(f".{out.name}.tmp")
            with open(tmp, "wb", opener=open_private) as dst:
                for raw in src:
                    if raw.endswith(b"\n"):
                        dst.write(raw)
        out_head = Path(f"{out}{HEAD_SUFFIX}")
        if head_bytes is not None:
            out_head.write_bytes(head_bytes)
        else:
            out_head.unlink(missing_ok=True)
        tmp.replace(out)
    except OSError as exc:
        raise ConfigError(f"cannot export {path}: {exc.strerror or exc}") from exc


def _note_key_change(config: ServerConfig, keyring: str) -> None:
    """Tell running servers (after the file was replaced) to re-read the keys now."""
    conn = open_db(config.database)
    try:
        note_key_change(conn, keyring)
    finally:
        conn.close()


def cmd_key_rotate(args: argparse.Namespace) -> int:
    config = ServerConfig.load(args.state_dir)
    conn = open_db(config.database)
    try:
        return _rotate(args, config, ServerKeys.load(config.state_dir, conn=conn))
    finally:
        conn.close()


def _rotate(args: argparse.Namespace, config: ServerConfig, keys: ServerKeys) -> int:
    if args.tokens:
        new = keys.jwt.rotate(retain_for=float(args.grace if args.grace is not None else 86400))
        _note_key_change(config, "jwt")
        _audit(config, "admin:key.rotate", "*", keyring="jwt", kid=new.kid)
        print(f"token signing key rotated; new kid {new.kid}")
        return 0
    grace = (
        parse_duration(args.grace)
        if args.grace not in (None, "0")
        else (0.0 if args.grace == "0" else 30 * 86400.0)
    )
    secret = keys.narinfo.rotate(args.name, grace=grace)
    _note_key_change(config, "narinfo")
    _audit(config, "admin:key.rotate", "*", keyring="narinfo", key=secret.name)
    print(f"narinfo signing key rotated; new public key {secret.public().render()}")
    print("published keys: " + " ".join(k.render() for k in keys.narinfo.public_keys()))
    return 0


# -- parser --------------------------------------------------------------------------


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("state_dir", metavar="STATE_DIR", help="the server's state directory")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=fmt,
        description=textwrap.dedent(
            """\
            An identity-aware Nix binary cache. One read URL serves every slice
            (ORG/PROJECT) the caller may read; `nix copy --to` uploads to a slice URL.

              nixd-server init /var/lib/nixd-server --org acme
              nixd-server project create /var/lib/nixd-server acme/app
              nixd-server token create /var/lib/nixd-server --org acme --name ci --attr role=member
              nixd-server serve /var/lib/nixd-server --listen 0.0.0.0:8080

            Then: nix copy --to http://HOST:8080/cache/acme/app PATH (netrc password = token)
            and substituters = http://HOST:8080/cache/ with the key from `init`.
            """
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log the libraries' lines too (-vv: debug messages)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "init",
        formatter_class=fmt,
        help="create a state directory: config, policy, keys, an org and its admin token",
        description=textwrap.dedent(
            """\
            Create STATE_DIR with config.toml, policy.toml (org admins do everything in
            their org, members read and write, readers read), the narinfo signing key and
            the access-token key (keys/), the database, the organization, and an API token
            named `admin` with attribute role=admin. The token is printed once.
            """
        ),
    )
    _state(p)
    p.add_argument("--org", default="main", help="the first organization (default: main)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="address in config.toml")
    p.add_argument("--key-name", help="narinfo signing key name (default: ORG-cache-1)")
    p.add_argument(
        "--database",
        help="[storage] database: an SQLite file (default server.db) or a PostgreSQL URL "
        "without a password (postgresql://USER@HOST/DB, postgresql:///DB?host=/SOCKET/DIR)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "serve",
        formatter_class=fmt,
        help="run the server until SIGTERM/SIGINT",
        description=textwrap.dedent(
            """\
            Serve the cache. ADDR is host:port ([v6]:port), port 0 for any free port, or
            fd://N for an inherited socket; repeat --listen for several. Sockets passed by
            systemd's socket activation (LISTEN_FDS, systemd/nixd-server.socket) are
            served in place of server.listen. The bound URLs are logged and written to
            server.address_file (default run/address); under systemd (Type=notify) the
            first process sends READY=1 once every worker serves, and STOPPING=1 on
            SIGTERM. On SIGTERM downloads in flight get server.graceful_timeout seconds to
            finish.
            """
        ),
    )
    _state(p)
    p.add_argument("--listen", action="append", metavar="ADDR", help="override server.listen")
    p.add_argument("--workers", type=int, metavar="N", help="override server.workers")
    p.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="API tokens: create, list, revoke").add_subparsers(
        dest="token_command", metavar="ACTION", required=True
    )
    p = token.add_parser(
        "create",
        formatter_class=fmt,
        help="create an API token (printed once)",
        description=textwrap.dedent(
            """\
            Create a long-lived API token for an organization; only its hash is stored.
            The identity it proves is token:NAME with attributes org=ORG, credential=ID
            and every --attr. Attributes are facts the policy matches on (e.g. role=member),
            not permissions. Use it as the netrc password for `nix copy`, or exchange it
            at POST /api/v1/token/exchange for a short-lived access token.

            With --deploy ORG/FLAKE#OUTPUT the token is deploy-only (attribute deploy): it
            may resolve that output of the flake's releases (those matching
            --deploy-version, if given) and read exactly their closures from the cache,
            and nothing else; its exchanged access tokens keep that scope. For a target
            machine: nixd login token, then nixd apply.
            """
        ),
    )
    _state(p)
    p.add_argument("--org", required=True, help="the token's organization")
    p.add_argument("--name", required=True, help="a name unique among the org's live tokens")
    p.add_argument("--expires", metavar="DURATION", help="lifetime: 3600, 15m, 12h, 30d, 1y")
    p.add_argument("--attr", action="append", default=[], metavar="K=V", help="an attribute")
    p.add_argument(
        "--deploy",
        action="append",
        default=[],
        metavar="ORG/FLAKE#OUTPUT",
        help="a deploy-only token: it reads the closure of this recorded output of the "
        "flake's releases and nothing else (repeatable)",
    )
    p.add_argument(
        "--deploy-version",
        action="append",
        default=[],
        metavar="CONSTRAINT",
        help="only releases matching this version constraint (e.g. 1.*, ~1.2, =1.2.3)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (id, token, ...)")
    p.set_defaults(func=cmd_token_create)
    p = token.add_parser("list", help="list API tokens (never their secrets)")
    _state(p)
    p.add_argument("--org", help="only this organization's")
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_token_list)
    p = token.add_parser(
        "revoke",
        help="revoke an API token by ID or ORG/NAME; its next exchange or use fails",
    )
    _state(p)
    p.add_argument("credential", metavar="ID|ORG/NAME")
    p.set_defaults(func=cmd_token_revoke)

    org = sub.add_parser("org", help="organizations").add_subparsers(
        dest="org_command", metavar="ACTION", required=True
    )
    p = org.add_parser("create", help="create an organization")
    _state(p)
    p.add_argument("org", metavar="NAME")
    p.set_defaults(func=cmd_org_create)

    register_user_cli(sub, _state, _open, _audit)
    register_migrate(sub, _state)
    register_flake_cli(sub, _state, _open)
    register_gc(sub, _state, _open, _audit, lambda: _admin_identity().render())
    register_mirror(sub, _state, _open, _audit)

    project = sub.add_parser("project", help="projects (cache slices)").add_subparsers(
        dest="project_command", metavar="ACTION", required=True
    )
    p = project.add_parser(
        "create",
        help="create a project (or change its --public flag)",
        description="Create ORG/PROJECT, a slice paths are uploaded to at /cache/ORG/PROJECT. "
        "--public makes its paths readable by anyone, without credentials.",
    )
    _state(p)
    p.add_argument("project", metavar="ORG/PROJECT")
    p.add_argument("--public", action="store_true", help="readable by anyone")
    p.set_defaults(func=cmd_project_create)
    p = project.add_parser("list", help="list projects")
    _state(p)
    p.add_argument("--org", help="only this organization's")
    p.set_defaults(func=cmd_project_list)
    register_view_cli(org, project, _state, _open, _audit)

    policy = sub.add_parser("policy", help="inspect the access policy").add_subparsers(
        dest="policy_command", metavar="ACTION", required=True
    )
    p = policy.add_parser(
        "explain",
        formatter_class=fmt,
        help="decide one request offline and say which rule decided",
        description=textwrap.dedent(
            """\
            Evaluate the policy in force (policy.toml, or the database's with PostgreSQL
            metadata) for one identity, action and resource, as the server would. Exit 0
            on allow, 2 on deny. Example:

              nixd-server policy explain STATE --identity token:ci --attr org=acme \\
                  --attr role=member --action cache:write --resource acme/app
            """
        ),
    )
    _state(p)
    p.add_argument("--identity", required=True, metavar="KIND:SUBJECT")
    p.add_argument("--attr", action="append", default=[], metavar="K=V")
    p.add_argument("--action", required=True, choices=ACTIONS)
    p.add_argument("--resource", required=True, metavar="ORG/PROJECT")
    p.add_argument("--source-ip", metavar="IP", help="the caller's address, for CIDR rules")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_explain)
    register_policy_cli(policy, _state, _open, _audit)

    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="audit_command", metavar="ACTION", required=True
    )
    p = audit.add_parser(
        "verify",
        help="check the hash chain; exit 2 and name the first bad line if it was edited",
    )
    _state(p)
    p.add_argument("--file", help="verify this file instead of the configured log")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser(
        "export",
        help="write the audit chain in the file format (the database's, on PostgreSQL)",
        description=(
            "Write every record of the configured audit log (the database table when "
            "[storage] database is PostgreSQL, else the file) as lines of the file format, "
            "to stdout or --output FILE (with FILE.head, so `audit verify --file FILE` "
            "checks it whole). Every record is written; exit 2 if the chain does not verify."
        ),
    )
    _state(p)
    p.add_argument("--file", help="export this file instead of the configured log")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--json", action="store_true", help="the verdict as JSON on stderr")
    p.set_defaults(func=cmd_audit_export)

    key = sub.add_parser("key", help="signing keys").add_subparsers(
        dest="key_command", metavar="ACTION", required=True
    )
    p = key.add_parser(
        "rotate",
        formatter_class=fmt,
        help="rotate the narinfo signing key (or --tokens: the access-token key)",
        description=textwrap.dedent(
            """\
            Make a new current narinfo signing key. The old one keeps co-signing and is
            still published at /api/v1/cache/keys for --grace (default 30d) so clients can
            re-pin; --grace 0 drops it at once (a compromised key). With --tokens, rotate
            the access-token key instead (old tokens verify for --grace seconds, default
            86400; 0 invalidates every outstanding token).
            """
        ),
    )
    _state(p)
    p.add_argument("--name", help="new key name (default: bump the current one's number)")
    p.add_argument("--grace", help="how long the old key stays valid")
    p.add_argument("--tokens", action="store_true", help="rotate the access-token key")
    p.set_defaults(func=cmd_key_rotate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # a server's own INFO lines (serving, reloads) stay; libraries' only with -v
    return run_command(
        build_parser(),
        argv,
        log_format="nixd-server: %(levelname)s: %(name)s: %(message)s",
        own_level=logging.INFO,
    )


if __name__ == "__main__":
    sys.exit(main())
