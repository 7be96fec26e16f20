"""``nixd resolve`` / ``nixd apply`` pieces: references, Nix's progress log, and the
profile and activation steps against a real chroot store (closures built by the real Nix).

The whole flow (server, daemon, deploy token) is in tests/integration/test_apply_e2e.py.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from nixd.cli import main
from nixd.commands import _activation as act
from nixd.commands.apply import Progress, fetch_command
from nixd.commands.resolve import FlakeRef, parse_ref
from nixd.errors import ConfigError
from tests.daemon.conftest import REPO
from tests.proxy.hostile import Hostile, response
from tests.realnix import RealNix
from tests.server.test_nix_e2e import configure

# -- references -------------------------------------------------------------------------


def test_references() -> None:
    ref = parse_ref("acme/sys/1.*#nixosConfigurations.web1.config.system.build.toplevel")
    assert ref == FlakeRef(
        "acme", "sys", "1.*", "nixosConfigurations.web1.config.system.build.toplevel"
    )
    assert str(ref) == "acme/sys/1.*#nixosConfigurations.web1.config.system.build.toplevel"
    assert ref.api_path() == (
        "/api/v1/flakes/acme/sys/releases/1.*/outputs/"
        "nixosConfigurations.web1.config.system.build.toplevel"
    )
    spaced = parse_ref("acme/sys/>=1.2 <2#out")
    assert spaced.api_path(check=True) == (
        "/api/v1/flakes/acme/sys/releases/%3E%3D1.2%20%3C2/outputs/out?check=1"
    )
    assert (
        parse_ref("acme/sys/^1.2#out")
        .api_path()
        .startswith("/api/v1/flakes/acme/sys/releases/^1.2/")
    )
    assert parse_ref("acme/sys/1.0.0", need_output=False).output == ""


@pytest.mark.parametrize(
    "text",
    [
        "acme/sys#out",  # no version
        "acme/sys/1.0/extra#out",
        "acme//1.0#out",
        "acme/sys/1.0",  # no output where one is needed
        "acme/sys/1.0#",
        "acme/sys/1.0#a..b",
        "acme/sys/1.0#a/b",
        "acme/sys/1.0#a#b",
        "acme/sys/1.0#.a",
        "acme/sys/1.0\n#out",
        "acme/sys/" + "1" * 2000 + "#out",
    ],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_ref(text)


def test_traversal_is_quoted_into_one_segment() -> None:
    """A name cannot reach another route: '/' never survives into the path."""
    with pytest.raises(ConfigError):
        parse_ref("../../token/exchange#x")
    ref = FlakeRef("a%2F..", "b", "1", "c")
    assert ref.api_path().startswith("/api/v1/flakes/a%252F../b/")


# -- progress ---------------------------------------------------------------------------

# Lines of Nix 2.8's `nix copy --from http://... --log-format internal-json -v`.
NIX_LOG = [
    '@nix {"action":"start","fields":["http://127.0.0.1:4/nix-cache-info"],"id":1,"level":4,'
    '"text":"downloading","type":101}',
    '@nix {"action":"stop","id":1}',
    '@nix {"action":"start","fields":["/nix/store/aaaa-dep","http://127.0.0.1:4","local"],'
    '"id":2,"level":3,"text":"copying path","type":100}',
    '@nix {"action":"start","fields":["http://127.0.0.1:4/nar/aaaa-x.nar.zst"],"id":3,'
    '"level":4,"text":"downloading","type":101}',
    '@nix {"action":"result","fields":[1048576,2097152,0,0],"id":3,"type":105}',
    '@nix {"action":"result","fields":[2097152,2097152,0,0],"id":3,"type":105}',
    '@nix {"action":"stop","id":3}',
    '@nix {"action":"stop","id":2}',
    '@nix {"action":"msg","level":1,"msg":"warning: something"}',
    '@nix {"action":"msg","level":0,"msg":"error: path is not valid"}',
    '@nix {"action":"msg","level":3,"msg":"chatter"}',
    "not json at all",
    '@nix {"action":"result","fields":"no list","id":3,"type":105}',
    '@nix {"action":"start","fields":[[]],"id":"x","type":100}',
    "@nix [1, 2]",
    "@nix {",
]


def test_progress_from_nix_log() -> None:
    out = io.StringIO()
    ticks = iter(range(0, 1000, 1))
    progress = Progress(2, 3 << 20, out, clock=lambda: float(next(ticks)))
    for line in NIX_LOG:
        progress.feed(line)
    assert progress.copied == 1 and progress.downloaded == 2 << 20
    assert progress.errors == ["error: path is not valid"]
    text = out.getvalue()
    assert (
        "nixd: fetched 1 of 2 paths (closure 3.0 MiB), 2.0 MiB downloaded: /nix/store/aaaa-dep"
        in text
    )
    assert "fetched 0 of 2 paths (closure 3.0 MiB), 1.0 MiB downloaded" in text
    assert "warning: something" in text and "chatter" not in text and "not json at all" in text


def test_fetch_command() -> None:
    assert fetch_command("http://127.0.0.1:9", "/nix/store/x", "/tmp/s") == [
        "nix", "copy", "--extra-experimental-features", "nix-command", "--from",
        "http://127.0.0.1:9", "--log-format", "internal-json", "-v", "--store", "/tmp/s",
        "/nix/store/x",
    ]  # fmt: skip
    assert fetch_command(None, "/nix/store/x", None)[:3] == [
        "nix-store",
        "--realise",
        "/nix/store/x",
    ]


# -- stores, profiles, plans ------------------------------------------------------------


def test_store_roots() -> None:
    assert act.store_root(None) == Path("/")
    assert act.store_root("daemon") == Path("/")
    assert act.store_root("/tmp/s") == Path("/tmp/s")
    assert act.store_root("local?root=/tmp/r") == Path("/tmp/r")
    with pytest.raises(ConfigError):
        act.store_root("http://cache.example.com")
    with pytest.raises(ConfigError):
        act.store_root("ssh://host")


def test_profile_target_follows_generations_and_stops_at_loops(tmp_path: Path) -> None:
    (tmp_path / "system-3-link").symlink_to("/nix/store/abc-system")
    (tmp_path / "system").symlink_to("system-3-link")
    assert act.profile_target(tmp_path / "system") == "/nix/store/abc-system"
    assert act.profile_target(tmp_path / "none") is None
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    assert act.profile_target(tmp_path / "a") is None


def test_plans_refuse_what_a_target_does_not_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="takes --action switch"):
        act.plan(act.TARGETS["nix-darwin"], "boot", "/nix/store/x", None, None)
    with pytest.raises(ConfigError, match="needs --profile"):
        act.plan(act.TARGETS["profile"], None, "/nix/store/x", None, None)
    p = act.plan(act.TARGETS["nixos"], "test", "/nix/store/x-sys", str(tmp_path), None)
    assert p.profile == Path(act.SYSTEM_PROFILE) and not p.sets_profile
    assert p.argv == [f"{tmp_path}/nix/store/x-sys/bin/switch-to-configuration", "test"]
    hm = act.plan(act.TARGETS["home-manager"], "dry-activate", "/nix/store/x-hm", None, None)
    assert hm.profile is None and hm.argv == ["/nix/store/x-hm/activate"]
    assert hm.target.environment("dry-activate") == {"DRY_RUN": "1"}
    assert "DRY_RUN=1 /nix/store/x-hm/activate" in "\n".join(hm.describe())


def test_default_outputs() -> None:
    host = act.hostname()
    assert act.TARGETS["nixos"].default_output() == (
        f"nixosConfigurations.{host}.config.system.build.toplevel"
    )
    assert act.TARGETS["nix-darwin"].default_output() == f"darwinConfigurations.{host}.system"
    assert act.TARGETS["home-manager"].default_output() == (
        f"homeConfigurations.{act.username()}.activationPackage"
    )
    assert act.TARGETS["profile"].default_output() == f"packages.{act.nix_system()}.default"


# -- against a real chroot store --------------------------------------------------------

RECORDER = 'echo "$(basename "$0")" "$@" >> "$NIXD_APPLY_RECORD"'


def _system(name: str, status: int) -> str:
    """A derivation whose switch-to-configuration and activate record and exit ``status``."""
    script = "\n".join([
        "export PATH=/usr/bin:/bin",
        "mkdir -p $out/bin",
        f"printf '%s\\n' '#!/bin/sh' '{RECORDER}' 'exit {status}' > $out/activate",
        "cp $out/activate $out/bin/switch-to-configuration",
        "chmod +x $out/bin/switch-to-configuration $out/activate",
    ])  # fmt: skip
    body = json.dumps(script).replace("${", "\\${")
    return (
        f'derivation {{ name = "fake-{name}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = [ "-c" {body} ]; }}'
    )


@pytest.fixture
def nix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RealNix:
    nix = RealNix.create(tmp_path / "nix")
    configure(nix)
    for key, value in nix.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NIXD_APPLY_RECORD", str(tmp_path / "record"))
    return nix


def _build(nix: RealNix, name: str, status: int = 0) -> str:
    return nix.build(_system(name, status))


@pytest.mark.realnix
def test_nixos_switch_then_another_generation_then_a_failed_activation(
    nix: RealNix, tmp_path: Path
) -> None:
    store = str(nix.store)
    record = tmp_path / "record"
    profile = tmp_path / "profiles" / "system"
    first = _build(nix, "one")
    p = act.plan(act.TARGETS["nixos"], "switch", first, store, str(profile))
    assert p.previous is None and p.changes_profile
    act.apply_plan(p)
    assert act.profile_target(profile) == first
    assert record.read_text().splitlines() == ["switch-to-configuration switch"]

    second = _build(nix, "two")
    p = act.plan(act.TARGETS["nixos"], "boot", second, store, str(profile))
    assert p.previous == first
    act.apply_plan(p)
    assert act.profile_target(profile) == second
    assert sorted(x.name for x in profile.parent.iterdir()) == [
        "system", "system-1-link", "system-2-link",
    ]  # fmt: skip
    # the same again: no new generation
    act.apply_plan(act.plan(act.TARGETS["nixos"], "switch", second, store, str(profile)))
    assert len(list(profile.parent.iterdir())) == 3

    failing = _build(nix, "three", status=3)
    p = act.plan(act.TARGETS["nixos"], "switch", failing, store, str(profile))
    with pytest.raises(act.ActivationError, match=r"exit status 3.*--rollback"):
        act.apply_plan(p)
    assert act.profile_target(profile) == failing  # as nixos-rebuild leaves it


@pytest.mark.realnix
def test_home_manager_sets_an_explicit_profile_only_after_activation(
    nix: RealNix, tmp_path: Path
) -> None:
    store = str(nix.store)
    profile = tmp_path / "hm" / "home-manager"
    failing = _build(nix, "hm-bad", status=1)
    with pytest.raises(act.ActivationError):
        act.apply_plan(act.plan(act.TARGETS["home-manager"], None, failing, store, str(profile)))
    assert not profile.exists()
    good = _build(nix, "hm-good")
    act.apply_plan(act.plan(act.TARGETS["home-manager"], None, good, store, str(profile)))
    assert act.profile_target(profile) == good
    assert (tmp_path / "record").read_text().splitlines() == ["activate", "activate"]


@pytest.mark.realnix
def test_a_closure_without_the_program_changes_nothing(nix: RealNix, tmp_path: Path) -> None:
    plain = nix.build(
        'derivation { name = "plain"; system = builtins.currentSystem; builder = "/bin/sh"; '
        'args = [ "-c" "echo x > $out" ]; }'
    )
    profile = tmp_path / "p" / "system"
    for target in ("nixos", "nix-darwin"):
        p = act.plan(act.TARGETS[target], None, plain, str(nix.store), str(profile))
        with pytest.raises(act.ActivationError, match="nothing was changed"):
            act.apply_plan(p)
    assert not profile.exists() and not (tmp_path / "record").exists()
    # the profile shape runs nothing and only needs the path
    act.apply_plan(act.plan(act.TARGETS["profile"], None, plain, str(nix.store), str(profile)))
    assert act.profile_target(profile) == plain
    assert json.dumps(os.readlink(profile)) == '"system-1-link"'


CHECK = """
import sys
from nixd.cli import main
from nixd.commands import _activation as act
p = act.plan(act.TARGETS["nixos"], None, "/nix/store/x", None, sys.argv[1])
try:
    act.check_writable(p)
except act.ActivationError as exc:
    print("refused:", exc)
else:
    print("allowed")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root")
def test_an_unwritable_profile_is_refused_before_anything(tmp_path: Path) -> None:
    """As an unprivileged user (the real ``nobody``): refused, naming the directory."""
    shared = Path(tempfile.mkdtemp(prefix="nixd-profile-"))
    try:
        shared.chmod(0o755)
        (shared / "mine").mkdir()
        os.chown(shared / "mine", pwd.getpwnam("nobody").pw_uid, -1)

        def as_nobody(profile: Path) -> str:
            done = subprocess.run(
                ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={REPO}", "python3", "-c",
                 CHECK, str(profile)],
                capture_output=True, text=True, check=True, timeout=60, cwd="/",
            )  # fmt: skip
            return done.stdout.strip()

        out = as_nobody(shared / "a" / "system")
        assert out.startswith("refused:") and f"{shared} is not writable" in out
        assert as_nobody(shared / "mine" / "profiles" / "system") == "allowed"
    finally:
        shutil.rmtree(shared)


# -- resolve against a scripted (hostile) server ----------------------------------------

ROUTE = "/api/v1/flakes/acme/sys/releases/{v}/outputs/out"
GOOD = "/nix/store/" + "a" * 32 + "-system"


def _answer(status: int, body: object) -> object:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], data
    )


async def test_resolve_takes_only_what_the_server_may_say(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = Hostile()
    routes = {
        "1.0.0": _answer(200, {"version": "1.0.0", "output": "out", "store_path": GOOD,
                               "closure": {"paths": 2, "nar_size": 10}, "complete": True}),
        "2.0.0": _answer(200, {"version": "2\x1b[31m", "store_path": GOOD,
                               "closure": {"paths": -5, "nar_size": "x"}, "complete": True}),
        "3.0.0": _answer(200, {"store_path": "/nix/store/../../etc/passwd"}),
        "4.0.0": _answer(200, {"store_path": GOOD + "/bin/sh"}),
        "5.0.0": _answer(409, {"error": "incomplete", "message": "2 paths missing",
                               "missing": [GOOD, "/etc/shadow", 7]}),
        "6.0.0": _answer(404, {"error": "not-found", "message":
                               "output out was not recorded for acme/sys 6.0.0"}),
        "7.0.0": _answer(404, b""),
        "8.0.0": _answer(200, b"[1, 2]"),
        "9.0.0": _answer(200, {"store_path": GOOD, "complete": False,
                               "missing": [GOOD], "missing_count": 3}),
    }  # fmt: skip
    server.routes.update({ROUTE.format(v=v): r for v, r in routes.items()})  # type: ignore[misc]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        url = f"http://127.0.0.1:{server.port}"

        async def resolve(version: str, *extra: str) -> tuple[int, str, str]:
            code: int = await trio.to_thread.run_sync(
                main, ["resolve", f"acme/sys/{version}#out", "--server", url, *extra]
            )
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        assert await resolve("1.0.0") == (0, GOOD + "\n", "")
        code, out, _ = await resolve("2.0.0", "--check")
        assert code == 0 and "\x1b" not in out and "0 paths, 0 bytes" in out
        for bad in ("3.0.0", "4.0.0"):  # traversal, a path inside a store path
            code, out, err = await resolve(bad)
            assert code == 1 and out == "" and "no valid store path" in err
        code, out, err = await resolve("8.0.0")  # not an object
        assert code == 1 and out == "" and "HTTP 200" in err
        code, out, err = await resolve("5.0.0", "--json")
        assert code == 1 and json.loads(out)["error"]["missing"] == [GOOD]  # only store paths
        code, _, err = await resolve("6.0.0")
        assert code == 1 and "was not recorded" in err
        code, _, err = await resolve("7.0.0")
        assert code == 1 and "no release of acme/sys matching 7.0.0" in err
        code, out, _ = await resolve("9.0.0", "--check")
        assert code == 1 and "INCOMPLETE, 3 paths missing" in out and "and 2 more" in out
        # a constraint with characters a path cannot carry reaches the route encoded
        await resolve(">=1 <2")
        assert server.requests[-1][0] == ROUTE.format(v="%3E%3D1%20%3C2")
        nursery.cancel_scope.cancel()
