"""``nixd apply`` end to end: CI publishes a built system, a target with a deploy-only token
fetches it through its daemon's proxy with the real Nix 2.8 and activates it.

"CI" builds a fake system closure (plain derivations, builder ``/bin/sh``, no nixpkgs)
whose ``bin/switch-to-configuration`` and ``activate`` append their name, arguments and
``DRY_RUN`` to the file named by ``NIXD_APPLY_RECORD``; it pushes the closure with
``nix copy --to`` as a token of acme and publishes ``acme/sys`` recording it under each
target's output attribute. A target machine runs the real daemon, logged in with
``nixd login token`` with a deploy-only token (``--deploy acme/sys#OUTPUT`` for each
output), and ``nixd apply`` installs into a chroot store and a profile under the test's
directory.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from nixd.commands.apply import Progress, fetch
from nixd.server.http.flakes import RELEASE_TYPE
from tests.daemon.conftest import NIXD, REPO, DaemonProcess, start_daemon, write_config
from tests.integration.conftest import SERVER_HOST
from tests.integration.flake_fixtures import AUDIENCE, clean_env
from tests.integration.relay import PacedRelay
from tests.oidc_issuer import LocalIssuer, run_issuer
from tests.realnix import RealNix
from tests.server.conftest import audit_text
from tests.server.flakeenv import metadata, tarball
from tests.server.test_nix_e2e import closure, configure, copy_to, exchange
from tests.serverproc import ServerProcess, server_cli, start_server

pytestmark = pytest.mark.realnix

NIXOS = "nixosConfigurations.web1.config.system.build.toplevel"
DARWIN = "darwinConfigurations.mac1.system"
HOME = "homeConfigurations.alice.activationPackage"
PACKAGE = "packages.x86_64-linux.default"
OUTPUTS = (NIXOS, DARWIN, HOME, PACKAGE)
NIX_CONF = (
    "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n"
    "substituters =\nfsync-metadata = false\n"
)
RECORDER = 'echo "$(basename "$0")" "$@" "DRY_RUN=${DRY_RUN:-}" >> "$NIXD_APPLY_RECORD"'
SYSTEM = """let
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" script ];
  };
  lib = mk "fake-lib-SALT" "echo lib SALT > $out";
  big = mk "fake-big-SALT" "/usr/bin/head -c BIG /dev/urandom > $out";
in mk "fake-system-SALT" (SCRIPT + "echo ${lib} ${big} > $out/refs\\n")
"""


def system_expr(salt: str, big: int) -> str:
    lines = [
        "export PATH=/usr/bin:/bin",
        "mkdir -p $out/bin",
        f"printf '%s\\n' '#!/bin/sh' '{RECORDER}' > $out/bin/switch-to-configuration",
        "cp $out/bin/switch-to-configuration $out/activate",
        "chmod +x $out/bin/switch-to-configuration $out/activate",
        "",
    ]
    script = json.dumps("\n".join(lines)).replace("${", "\\${")
    return SYSTEM.replace("SCRIPT", script).replace("SALT", salt).replace("BIG", str(big))


@dataclass
class Deploy:
    server: ServerProcess
    github: LocalIssuer
    state: Path
    ci: RealNix
    push_netrc: Path
    root: Path

    def build(self, big: int = 1000) -> str:
        return self.ci.build(system_expr(os.urandom(4).hex(), big))

    def push(self, path: str) -> None:
        url = f"{self.server.url}/cache/acme/app?compression=none"
        done = copy_to(self.ci, url, self.push_netrc, path)
        assert done.returncode == 0, done.stderr.decode()

    def publish(self, name: str, version: str, top: str) -> httpx.Response:
        r = httpx.post(
            f"{self.server.url}/api/v1/token/exchange",
            json={"kind": "github-action", "token": self.github.github_token(audience=AUDIENCE)},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        meta = json.dumps(metadata(outputs=dict.fromkeys(OUTPUTS, top))).encode()
        return httpx.put(
            f"{self.server.url}/api/v1/flakes/acme/{name}/releases/{version}",
            content=meta + tarball(),
            headers={
                "authorization": f"Bearer {r.json()['access_token']}",
                "content-type": RELEASE_TYPE,
                "x-nixd-metadata-length": str(len(meta)),
            },
            timeout=60,
        )

    def deploy_token(self, name: str, flake: str) -> str:
        grants = [a for out in OUTPUTS for a in ("--deploy", f"acme/{flake}#{out}")]
        done = server_cli(
            "token", "create", str(self.state), "--org", "acme", "--name", name, *grants, "--json"
        )
        return str(json.loads(done.stdout)["token"])


@pytest.fixture(scope="module")
def deploy() -> Iterator[Deploy]:
    with run_issuer("github") as gh:
        root = Path(os.environ.get("TMPDIR", "/tmp")) / f"nixd-apply-{os.getpid()}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        state = root / "server"
        server_cli("init", str(state), "--org", "acme")
        server_cli("project", "create", str(state), "acme/app")
        with (state / "config.toml").open("a") as f:
            f.write(
                f'\n[[github]]\norg = "acme"\naudience = "{AUDIENCE}"\n'
                f'owner_ids = ["1001"]\nissuer = "{gh.url}"\n'
            )
        created = server_cli("token", "create", str(state), "--org", "acme", "--name", "ci",
                             "--json").stdout  # fmt: skip
        server = start_server(state, host=SERVER_HOST, log_path=root / "server.log")
        try:
            ci = RealNix.create(root / "ci")
            configure(ci)
            push = root / "push-netrc"
            access = exchange(server.url, json.loads(created)["token"])
            push.write_text(f"machine {SERVER_HOST} login nixd password {access}\n")
            push.chmod(0o600)
            yield Deploy(server, gh, state, ci, push, root)
        finally:
            server.close()
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class Target:
    daemon: DaemonProcess
    machine: Path
    store: Path
    record: Path

    def env(self) -> dict[str, str]:
        (self.machine / "home").mkdir(exist_ok=True)
        return {
            "NIX_CONF_DIR": str(self.machine / "etc"),
            "NIX_USER_CONF_FILES": "",
            "XDG_CACHE_HOME": str(self.machine / "cache"),
            "HOME": str(self.machine / "home"),
            "NIX_REMOTE": "",
            "NIXD_APPLY_RECORD": str(self.record),
        }

    async def nixd(self, *args: str, within: float = 300) -> tuple[int, str, str]:
        with trio.fail_after(within):
            done = await trio.run_process(
                [*NIXD, *args, "--socket", self.daemon.socket],
                env=clean_env(self.env()), capture_stdout=True, capture_stderr=True,
                check=False, cwd=str(REPO),
            )  # fmt: skip
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def recorded(self) -> list[str]:
        if not self.record.exists():
            return []
        return self.record.read_text().splitlines()

    def real(self, path: str) -> Path:
        return self.store / path.lstrip("/")


async def _target(root: Path, server_url: str, token: str, factory: list[DaemonProcess]) -> Target:
    machine = root / "machine"
    machine.mkdir()
    config = write_config(machine, server_url=server_url)
    (machine / "etc" / "nix.conf").write_text(NIX_CONF)
    daemon = await start_daemon(machine, config)
    factory.append(daemon)
    await daemon.wait_for("READY=1")
    target = Target(daemon, machine, root / "store", root / "record")
    (root / "token").write_text(token + "\n")
    code, _, err = await target.nixd("login", "token", "--token-file", str(root / "token"))
    assert code == 0, err + daemon.log()[-3000:]
    return target


@pytest.fixture
async def target(
    deploy: Deploy, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> AsyncIterator[tuple[Target, str, str]]:
    """A published release ``acme/sys`` 0.1.0 and a target logged in with its deploy token."""
    name = f"sys{os.urandom(3).hex()}"
    top = deploy.build()
    deploy.push(top)
    r = deploy.publish(name, "0.1.0", top)
    assert r.status_code == 201, r.text
    token = deploy.deploy_token(f"kiosk-{name}", name)
    yield await _target(tmp_path, deploy.server.url, token, daemon_factory), name, top


def _ok(code: int, out: str, err: str, t: Target) -> str:
    assert code == 0, err + "\n--- daemon\n" + t.daemon.log()[-3000:]
    return out


@pytest.mark.parametrize(
    ("shape", "output", "action", "profile_set", "recorded"),
    [
        ("nixos", NIXOS, "switch", True, "switch-to-configuration switch DRY_RUN="),
        ("nixos", NIXOS, "boot", True, "switch-to-configuration boot DRY_RUN="),
        ("nixos", NIXOS, "test", False, "switch-to-configuration test DRY_RUN="),
        ("nixos", NIXOS, "dry-activate", False, "switch-to-configuration dry-activate DRY_RUN="),
        ("nix-darwin", DARWIN, None, True, "activate DRY_RUN="),
        ("home-manager", HOME, None, True, "activate DRY_RUN="),
        ("home-manager", HOME, "dry-activate", False, "activate DRY_RUN=1"),
        ("profile", PACKAGE, None, True, None),
    ],
)
async def test_apply_fetches_sets_the_profile_and_activates(
    deploy: Deploy,
    target: tuple[Target, str, str],
    shape: str,
    output: str,
    action: str | None,
    profile_set: bool,
    recorded: str | None,
) -> None:
    t, name, top = target
    profile = t.machine / "profiles" / "system"
    args = ["apply", shape, f"acme/{name}/0.*#{output}", "--store", str(t.store),
            "--profile", str(profile), "--json"]  # fmt: skip
    if action:
        args += ["--action", action]

    dry = json.loads(_ok(*await t.nixd(*args, "--dry-run"), t))
    assert dry["store_path"] == top and dry["version"] == "0.1.0" and dry["dry_run"] is True
    assert dry["previous"] is None and dry["present"] is False
    assert dry["profile_changed"] is profile_set
    assert not t.real(top).exists() and t.recorded() == [] and not profile.exists()

    code, out, err = await t.nixd(*args)
    result = json.loads(_ok(code, out, err, t))
    assert result["store_path"] == top and result["output"] == output
    # the whole closure is in the chroot store, byte for byte as CI built it
    for path in closure(deploy.ci, top):
        assert t.real(path).exists(), path
    assert (t.real(top) / "refs").read_text() == (deploy.ci.real_path(top) / "refs").read_text()
    assert "paths" in err and "MiB" in err  # progress on stderr
    assert t.recorded() == ([recorded] if recorded else [])
    if profile_set:
        link = os.readlink(profile)
        assert os.readlink(profile.parent / link) == top
        assert result["profile_changed"] is True
    else:
        assert not profile.exists()

    # the server audited the resolve and every read of the deploy credential
    lines = [json.loads(x) for x in audit_text(deploy.state).splitlines() if x.strip()]
    mine = [e for e in lines if e.get("identity") == f"token:acme/kiosk-{name}"]
    resolves = [e for e in mine if e["action"] == "flake:resolve" and e.get("store_path")]
    assert resolves and all(e["store_path"] == top for e in resolves)
    assert {e["output"] for e in resolves} == {output}
    reads = [e for e in mine if e["action"] == "deploy:read"]
    assert {e["path"] for e in reads} == set(closure(deploy.ci, top))
    assert all(e["store_path"] == top for e in reads)

    # applying the same again changes nothing in the profile, activates again
    again = json.loads(_ok(*await t.nixd(*args, "--dry-run"), t))
    assert again["present"] is True
    assert again["previous"] == (top if profile_set else None)
    assert again["profile_changed"] is False


async def test_resolve_through_the_proxy_with_a_deploy_token(
    deploy: Deploy, target: tuple[Target, str, str]
) -> None:
    t, name, top = target
    code, out, err = await t.nixd("resolve", f"acme/{name}/0.1.0#{NIXOS}")
    assert code == 0, err
    assert out.strip() == top
    code, out, err = await t.nixd("resolve", f"acme/{name}/0.*#{NIXOS}", "--check")
    assert code == 0, err
    assert "complete" in out and top in out
    body = json.loads(_ok(*await t.nixd("resolve", f"acme/{name}/0.*#{NIXOS}", "--json"), t))
    assert body["complete"] is True and body["closure"]["paths"] == len(closure(deploy.ci, top))
    # not recorded: the server's words
    # an output the token was not given: as if it did not exist
    code, out, err = await t.nixd("resolve", f"acme/{name}/0.1.0#packages.aarch64-linux.default")
    assert code == 1 and "no release" in err
    # another flake: as if it did not exist
    code, _, err = await t.nixd("resolve", f"acme/nothere/0.1.0#{NIXOS}")
    assert code == 1 and "no release" in err


async def test_a_target_that_is_not_the_shape_is_refused_before_any_change(
    deploy: Deploy, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    """A closure without the activation program: fetched, but no profile, nothing run."""
    name = f"pkg{os.urandom(3).hex()}"
    top = deploy.ci.build(
        'derivation { name = "plain-NAME"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo plain > $out" ]; }'.replace("NAME", name)
    )
    deploy.push(top)
    assert deploy.publish(name, "1.0.0", top).status_code == 201
    t = await _target(tmp_path, deploy.server.url, deploy.deploy_token(name, name),
                      daemon_factory)  # fmt: skip
    profile = t.machine / "profiles" / "system"
    code, _, err = await t.nixd("apply", "nixos", f"acme/{name}/1.0.0#{NIXOS}", "--store",
                                str(t.store), "--profile", str(profile))  # fmt: skip
    assert code == 1 and "no executable bin/switch-to-configuration" in err
    assert not profile.exists() and not any(profile.parent.glob("system*"))
    assert t.recorded() == []


def _blob_of(state: Path, narinfo: str) -> list[Path]:
    url = next(x for x in narinfo.splitlines() if x.startswith("URL: ")).removeprefix("URL: ")
    digest = url.removeprefix("nar/").split(".")[0]
    return [p for p in state.rglob("*") if p.is_file() and digest in p.name]


async def test_an_incomplete_closure_is_refused_and_nothing_happens(
    deploy: Deploy, target: tuple[Target, str, str]
) -> None:
    """A dependency went away after publishing: resolve names it, apply does nothing."""
    t, name, top = target
    lib = next(p for p in closure(deploy.ci, top) if "fake-lib" in p)
    token = exchange(deploy.server.url, deploy.deploy_token(f"gc-{name}", name))
    hash_part = lib.removeprefix("/nix/store/")[:32]
    async with httpx.AsyncClient() as client:
        info = await client.get(
            f"{deploy.server.url}/cache/{hash_part}.narinfo",
            headers={"authorization": f"Bearer {token}"},
        )
    assert info.status_code == 200, info.text
    blobs = _blob_of(deploy.state, info.text)
    assert blobs
    for blob in blobs:
        blob.unlink()
    server_cli("gc", str(deploy.state), "--grace", "0")

    code, out, err = await t.nixd("resolve", f"acme/{name}/0.1.0#{NIXOS}", "--check")
    assert code == 1 and "INCOMPLETE" in out and lib in out
    profile = t.machine / "profiles" / "system"
    code, out, err = await t.nixd("apply", "nixos", f"acme/{name}/0.1.0#{NIXOS}", "--store",
                                  str(t.store), "--profile", str(profile), "--json")  # fmt: skip
    assert code == 1, err
    error = json.loads(out)["error"]
    assert lib in error["missing"]
    assert not t.real(top).exists() and not profile.exists() and t.recorded() == []


async def test_the_server_going_away_mid_fetch_then_a_retry_at_once_succeeds(
    deploy: Deploy, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    """The daemon reaches the server through a paced relay, so the server is stopped while
    a large NAR is on its way; the failed apply changed nothing, and the same command run
    right after the server is back succeeds — with Nix's default negative TTL."""
    name = f"big{os.urandom(3).hex()}"
    big = 64 << 20  # more than the sockets between relay and server buffer
    top = deploy.build(big=big)
    deploy.push(top)
    assert deploy.publish(name, "0.1.0", top).status_code == 201
    token = deploy.deploy_token(name, name)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(
            PacedRelay(SERVER_HOST, deploy.server.port, rate=16 << 20).serve
        )
        t = await _target(tmp_path, relay.url, token, daemon_factory)
        # Nix's default negative TTL wins over the 0 of nixd's fragment (included above)
        with (t.machine / "etc" / "nix.conf").open("a") as f:
            f.write("narinfo-cache-negative-ttl = 3600\n")
        profile = t.machine / "profiles" / "system"
        args = ("apply", "nixos", f"acme/{name}/0.1.0#{NIXOS}", "--store", str(t.store),
                "--profile", str(profile), "--action", "switch")  # fmt: skip
        first: list[tuple[int, str, str]] = []

        async def first_apply() -> None:
            first.append(await t.nixd(*args))

        nursery.start_soon(first_apply)
        await relay.wait_forwarded(relay.forwarded + (8 << 20))
        deploy.server.stop(signal.SIGKILL)
        while not first:  # noqa: ASYNC110 - a task of this nursery
            await trio.sleep(0.05)
        code, _, err = first[0]
        assert code == 6, err  # unreachable
        assert "nothing was set or activated" in err
        assert t.recorded() == [] and not profile.exists() and not t.real(top).exists()

        await trio.to_thread.run_sync(deploy.server.start)
        code, out, err = await t.nixd(*args)
        assert code == 0, err + t.daemon.log()[-3000:]
        assert out.strip() == top
        assert t.recorded() == ["switch-to-configuration switch DRY_RUN="]
        assert os.readlink(profile.parent / os.readlink(profile)) == top
        assert t.real(top).exists()
        nursery.cancel_scope.cancel()


async def test_an_outage_remembered_by_nix_does_not_reach_nixd_apply(
    deploy: Deploy, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    """Why ``nixd apply``'s Nix has a narinfo cache of its own: with the server down, the
    proxy answers 404 for a narinfo (so builds go on, not remembered by the proxy); a
    plain ``nix copy`` with the machine's cache and Nix's default negative TTL remembers
    that for an hour and keeps failing after the server is back, while ``nixd apply``
    run right then succeeds."""
    name = f"out{os.urandom(3).hex()}"
    top = deploy.build()
    deploy.push(top)
    assert deploy.publish(name, "0.1.0", top).status_code == 201
    t = await _target(tmp_path, deploy.server.url, deploy.deploy_token(name, name),
                      daemon_factory)  # fmt: skip
    with (t.machine / "etc" / "nix.conf").open("a") as f:
        f.write("narinfo-cache-negative-ttl = 3600\n")
    env = {**os.environ, **t.env()}
    shown = await trio.run_process(
        ["nix", "show-config"], env=env, capture_stdout=True, capture_stderr=True
    )
    assert b"narinfo-cache-negative-ttl = 3600" in shown.stdout
    proxy = json.loads(
        (await t.nixd("status", "--json"))[1]
    )["proxy"]["url"].rstrip("/")  # fmt: skip

    async def plain_copy(dest: Path, cache: str = "") -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(120):
            return await trio.run_process(
                ["nix", "copy", "--from", proxy, "--store", str(dest), top],
                env={**env, **({"XDG_CACHE_HOME": cache} if cache else {})},
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip

    deploy.server.stop()
    try:
        refused = await plain_copy(tmp_path / "plain1")
        assert refused.returncode != 0
    finally:
        await trio.to_thread.run_sync(deploy.server.start)
    profile = t.machine / "profiles" / "system"
    code, _, err = await t.nixd("apply", "nixos", f"acme/{name}/0.1.0#{NIXOS}", "--store",
                                str(t.store), "--profile", str(profile))  # fmt: skip
    assert code == 0, err + t.daemon.log()[-3000:]
    assert t.recorded() == ["switch-to-configuration switch DRY_RUN="]
    # the proxy serves the path now, but the machine's Nix still says it is not there
    again = await plain_copy(tmp_path / "plain2")
    assert again.returncode != 0, "Nix did not remember the outage: the test shows nothing"
    assert b"no substituter that can build it" in again.stderr, again.stderr
    # the same command with a cache of its own works: it was only the remembered 404
    fresh = await plain_copy(tmp_path / "plain3", str(tmp_path / "fresh-cache"))
    assert fresh.returncode == 0, fresh.stderr


async def test_an_unprivileged_fetch_goes_through_nix_daemon(
    deploy: Deploy, tmp_path: Path, daemon_factory: list[DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Who cannot read the proxy's secret (not root) fetches with ``nix-store --realise``:
    a real ``nix-daemon`` with the machine's nix.conf substitutes the closure through the
    proxy, and the progress comes back through the daemon's log."""
    name = f"hm{os.urandom(3).hex()}"
    top = deploy.build()
    deploy.push(top)
    assert deploy.publish(name, "0.1.0", top).status_code == 201
    t = await _target(tmp_path, deploy.server.url, deploy.deploy_token(name, name),
                      daemon_factory)  # fmt: skip
    with (t.machine / "etc" / "nix.conf").open("a") as f:
        f.write(f"store = {t.store}\n")
    socket = tmp_path / "nix-daemon.sock"
    nix_daemon = await trio.lowlevel.open_process(
        ["nix-daemon"],
        env={"PATH": os.environ["PATH"], "NIX_CONF_DIR": str(t.machine / "etc"),
             "NIX_DAEMON_SOCKET_PATH": str(socket), "HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(30):
            while not await trio.Path(socket).exists():  # noqa: ASYNC110 - a file
                await trio.sleep(0.05)
        for key, value in t.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("NIX_REMOTE", f"unix://{socket}?root={t.store}")
        err = io.StringIO()
        progress = Progress(3, 0, err, present=lambda p: t.real(p).exists())
        attempts = await trio.to_thread.run_sync(
            functools.partial(fetch, None, top, None, progress, delays=())
        )
        assert attempts == 1, err.getvalue()
        for path in closure(deploy.ci, top):
            assert t.real(path).exists(), path
        assert progress.copied == 3, err.getvalue()
        assert "fetched 3 of 3 paths" in err.getvalue()
    finally:
        nix_daemon.terminate()
        with trio.move_on_after(10):
            await nix_daemon.wait()
        if nix_daemon.returncode is None:
            nix_daemon.kill()
            await nix_daemon.wait()


async def test_a_machine_that_is_not_logged_in_is_told_so(
    deploy: Deploy, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    machine = tmp_path / "machine"
    machine.mkdir()
    config = write_config(machine, server_url=deploy.server.url)
    (machine / "etc" / "nix.conf").write_text(NIX_CONF)
    daemon = await start_daemon(machine, config)
    daemon_factory.append(daemon)
    await daemon.wait_for("READY=1")
    t = Target(daemon, machine, tmp_path / "store", tmp_path / "record")
    code, out, err = await t.nixd("apply", "nixos", f"acme/sys/1.*#{NIXOS}", "--json",
                                  "--store", str(t.store))  # fmt: skip
    assert code == 6 and err == ""
    error = json.loads(out)["error"]
    assert error["kind"] == "unreachable" and "not logged in" in error["message"]
    code, _, err = await t.nixd("resolve", f"acme/sys/1.*#{NIXOS}")
    assert code == 6 and "not logged in" in err
    assert t.recorded() == [] and not t.store.exists()
