"""The Nix integration writer, checked through files on disk and the real Nix reading them."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from nixd.daemon.nixsetup import ApplyResult, NixSetup, NixSetupConfig, NixState
from nixd.errors import ConfigError, FormatError
from nixd.nix.netrc import NetrcEntry, parse_netrc
from tests.realnix import RealNix

KEY = "cache.example-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
KEY2 = "cache.example-2:AAAAdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
SECRET = "c2VjcmV0LXByb3h5LXBhc3N3b3JkLTAxMjM0NTY3ODk"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _state(**overrides: object) -> NixState:
    values: dict[str, object] = {
        "proxy_url": "http://127.0.0.1:41234",
        "proxy_secret": SECRET,
        "trusted_public_keys": (KEY,),
        "server_credentials": (("cache.example", "eyJhbGciOi.token.one"),),
    }
    values.update(overrides)
    return NixState(**values)  # type: ignore[arg-type]


class Env:
    """A conf dir like /etc/nix with nixd's setup pointed at it."""

    def __init__(self, conf_dir: Path, **config: object) -> None:
        self.dir = conf_dir
        self.main = conf_dir / "nix.conf"
        self.fragment = conf_dir / "nixd.conf"
        self.netrc = conf_dir / "nixd.netrc"
        self.setup = NixSetup(
            NixSetupConfig(
                nix_conf=self.main,
                fragment=self.fragment,
                netrc=self.netrc,
                **config,  # type: ignore[arg-type]
            )
        )


@pytest.fixture
def env(real_nix: RealNix) -> Env:
    return Env(Path(real_nix.env["NIX_CONF_DIR"]))


def _show_config(real_nix: RealNix) -> dict[str, str]:
    out = real_nix.run(["nix", "show-config"], store=False, env={"NIX_USER_CONF_FILES": ""})
    config = {}
    for line in out.stdout.decode().splitlines():
        name, _, value = line.partition(" = ")
        config[name] = value
    return config


def test_apply_is_read_by_nix_and_idempotent(real_nix: RealNix, env: Env) -> None:
    original = env.main.read_bytes()
    result = env.setup.apply(_state())
    assert result == ApplyResult(True, True, True)
    assert result.restart_needed

    config = _show_config(real_nix)
    assert config["substituters"].split().count("http://127.0.0.1:41234") == 1
    assert config["trusted-substituters"] == "http://127.0.0.1:41234"
    assert KEY in config["trusted-public-keys"].split()
    assert config["netrc-file"] == str(env.netrc)

    main = env.main.read_bytes()
    assert main.startswith(original)
    assert main.count(b"!include") == 1
    assert _mode(env.netrc) == 0o600
    assert _mode(env.fragment) == 0o644

    again = env.setup.apply(_state())
    assert not again
    assert not again.changed
    assert env.main.read_bytes() == main
    assert _show_config(real_nix)["substituters"].split().count("http://127.0.0.1:41234") == 1


def test_token_refresh_changes_only_the_netrc(env: Env) -> None:
    env.setup.apply(_state())
    result = env.setup.apply(_state(server_credentials=(("cache.example", "eyJ.token.two"),)))
    assert result == ApplyResult(netrc_changed=True)
    assert result.changed and not result.restart_needed
    assert "eyJ.token.two" in env.netrc.read_text()

    result = env.setup.apply(
        _state(
            server_credentials=(("cache.example", "eyJ.token.two"),),
            trusted_public_keys=(KEY, KEY2),
        )
    )
    assert result == ApplyResult(fragment_changed=True)
    assert result.restart_needed


def test_managed_netrc_merges_user_files_without_touching_them(env: Env, tmp_path: Path) -> None:
    default_netrc = env.dir / "netrc"
    default_netrc.write_text(
        "machine 127.0.0.1 login theirs password must-lose\n"
        "machine git.example login me password gitpw\n"
        'machine spaced.example login me password "has space"\n'
        "default login anon password anon\n"
    )
    extra = tmp_path / "extra-netrc"
    extra.write_text(
        "machine git.example login other password loses\nmachine s3.example login k password s\n"
    )
    broken = tmp_path / "broken-netrc"
    broken.write_text('machine x login y password "unterminated\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (default_netrc, extra, broken)}

    Env(env.dir, additional_netrc_sources=(extra, broken)).setup.apply(_state())

    entries = parse_netrc(env.netrc.read_text())
    assert entries[:2] == [
        NetrcEntry("127.0.0.1", "nixd", SECRET),
        NetrcEntry("cache.example", "nixd", "eyJhbGciOi.token.one"),
    ]
    # Configured sources come first, then the netrc Nix read before; default last.
    assert entries[2:] == [
        NetrcEntry("git.example", "other", "loses"),
        NetrcEntry("s3.example", "k", "s"),
        NetrcEntry(None, "anon", "anon"),
    ]
    for path, (data, mtime) in before.items():
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (data, mtime)


def test_netrc_file_named_in_nix_conf_is_merged(env: Env, tmp_path: Path) -> None:
    theirs = tmp_path / "their-netrc"
    theirs.write_text("machine private.example login u password p\n")
    env.main.write_text(env.main.read_text() + f"netrc-file = {theirs}\n")
    (env.dir / "netrc").write_text("machine unused.example login u password p\n")
    env.setup.apply(_state())
    machines = [e.machine for e in parse_netrc(env.netrc.read_text())]
    assert machines == ["127.0.0.1", "cache.example", "private.example"]
    # Our include comes after their netrc-file, so ours is the one Nix uses.
    assert env.main.read_text().rstrip().splitlines()[-1].startswith("!include")


def test_unmergeable_user_entries_are_logged_without_secrets(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    (env.dir / "netrc").write_text('machine spaced.example login me password "a secret"\n')
    with caplog.at_level(logging.WARNING):
        env.setup.apply(_state())
    assert "spaced.example" in caplog.text
    assert "a secret" not in caplog.text
    assert [e.machine for e in parse_netrc(env.netrc.read_text())] == [
        "127.0.0.1",
        "cache.example",
    ]


@pytest.mark.parametrize(
    "state",
    [
        _state(proxy_secret="x\nmachine evil.example login e password e"),
        _state(proxy_secret="two words"),
        _state(proxy_secret=""),
        _state(server_credentials=(("cache.example", "tok\ndefault login a password b"),)),
        _state(server_credentials=(("evil host", "tok"),)),
        _state(trusted_public_keys=("k:v\nnetrc-file = /evil",)),
        _state(proxy_url="http://127.0.0.1:1 http://evil.example"),
        _state(proxy_url="http://127.0.0.1:1#x"),
        _state(proxy_url="not-a-url"),
    ],
)
def test_injection_attempts_are_rejected_and_nothing_written(
    real_nix: RealNix, env: Env, state: NixState
) -> None:
    env.setup.apply(_state())
    snapshot = {p: p.read_bytes() for p in (env.main, env.fragment, env.netrc)}
    with pytest.raises((FormatError, ConfigError)):
        env.setup.apply(state)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert "evil" not in _show_config(real_nix).get("substituters", "")


@pytest.mark.parametrize("tail", ["", "# user's last line without newline"])
def test_remove_restores_the_original_byte_for_byte(real_nix: RealNix, env: Env, tail: str) -> None:
    env.main.write_text(env.main.read_text() + tail)
    env.main.chmod(0o640)
    original = env.main.read_bytes()
    user_netrc = env.dir / "netrc"
    user_netrc.write_text("machine git.example login me password pw\n")

    env.setup.apply(_state())
    env.setup.apply(_state())
    assert env.setup.remove() is True

    assert env.main.read_bytes() == original
    assert _mode(env.main) == 0o640
    assert not env.fragment.exists()
    assert not env.netrc.exists()
    assert user_netrc.read_text() == "machine git.example login me password pw\n"
    assert "http://127.0.0.1:41234" not in _show_config(real_nix)["substituters"]
    assert env.setup.remove() is False


def test_missing_nix_conf_is_created_and_removed_again(tmp_path: Path) -> None:
    env = Env(tmp_path)
    assert env.setup.apply(_state()).nix_conf_changed
    assert _mode(env.main) == 0o644
    assert env.setup.remove() is True
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _store_like_nix_conf(real_nix: RealNix, env: Env, text: str) -> Path:
    """NixOS's layout: nix.conf a symlink to a read-only file in a read-only directory."""
    store = real_nix.root / "store-like" / "abc123-nix.conf"
    store.mkdir(parents=True)
    (store / "nix.conf").write_text(text)
    (store / "nix.conf").chmod(0o444)
    store.chmod(0o555)
    env.main.unlink()
    env.main.symlink_to(store / "nix.conf")
    return store / "nix.conf"


def test_symlinked_read_only_nix_conf_that_includes_the_fragment_is_in_effect(
    real_nix: RealNix, env: Env, cache_info_server: int
) -> None:
    url = f"http://127.0.0.1:{cache_info_server}"
    static = _store_like_nix_conf(
        real_nix, env, env.main.read_text() + f"!include {env.fragment}\n"
    )
    before = static.read_bytes()
    result = env.setup.apply(_state(proxy_url=url))
    assert result.in_effect and result.problem is None
    assert (result.netrc_changed, result.fragment_changed, result.nix_conf_changed) == (
        True,
        True,
        False,
    )
    assert result.include_file is None  # managed elsewhere
    assert env.main.is_symlink() and static.read_bytes() == before
    assert sorted(p.name for p in env.dir.iterdir()) == ["nix.conf", "nixd.conf", "nixd.netrc"]

    config = _show_config(real_nix)
    assert url in config["substituters"].split()
    assert config["netrc-file"] == str(env.netrc)
    # and Nix really authenticates with the netrc nixd wrote
    real_nix.run(
        ["nix", "store", "ping", "--store", url], store=False, env={"NIX_USER_CONF_FILES": ""}
    )
    assert _CacheInfo.seen == ["Basic " + base64.b64encode(f"nixd:{SECRET}".encode()).decode()]

    assert env.setup.remove() is True
    assert env.main.is_symlink() and static.read_bytes() == before
    assert not env.fragment.exists() and not env.netrc.exists()


def test_symlinked_nix_conf_without_the_include_says_what_to_add(
    real_nix: RealNix, env: Env
) -> None:
    static = _store_like_nix_conf(real_nix, env, env.main.read_text())
    before = static.read_bytes()
    result = env.setup.apply(_state())
    assert not result.in_effect
    assert result.problem is not None
    assert f"does not include {env.fragment}" in result.problem
    assert f"`!include {env.fragment}`" in result.problem
    assert "services.nixd.enable = true;" in result.problem and "symlink" in result.problem
    # the fragment and netrc are there for when the include is added
    assert env.fragment.exists() and env.netrc.exists()
    assert env.main.is_symlink() and static.read_bytes() == before
    assert "http://127.0.0.1:41234" not in _show_config(real_nix)["substituters"]


def test_external_mode_never_touches_a_writable_nix_conf(real_nix: RealNix, env: Env) -> None:
    before = env.main.read_bytes()
    external = Env(env.dir, managed_by="external")
    result = external.setup.apply(_state())
    assert env.main.read_bytes() == before
    assert result.problem is not None and 'nix_conf_managed_by = "external"' in result.problem
    env.main.write_text(env.main.read_text() + f"include {env.fragment}\n")  # the admin's line
    assert external.setup.apply(_state()).in_effect
    assert "http://127.0.0.1:41234" in _show_config(real_nix)["substituters"].split()
    assert external.setup.remove() is True
    assert f"include {env.fragment}" in env.main.read_text()  # not nixd's line: kept


def test_determinate_layout_gets_the_include_in_nix_custom_conf(
    real_nix: RealNix, env: Env
) -> None:
    theirs = env.dir / "determinate-netrc"
    theirs.write_text("machine api.flakehub.com login flakehub password fh-token\n")
    env.main.write_text(
        "# Generated by Determinate Nixd. Put your settings in nix.custom.conf.\n"
        + env.main.read_text()
        + f"netrc-file = {theirs}\n"
        + "!include nix.custom.conf\n"
    )
    custom = env.dir / "nix.custom.conf"
    custom.write_text("# Written by the user\nkeep-outputs = true\n")
    main_before, custom_before = env.main.read_bytes(), custom.read_bytes()

    result = env.setup.apply(_state())
    assert result.in_effect and result.nix_conf_changed
    assert result.include_file == str(custom)
    assert env.main.read_bytes() == main_before
    assert custom.read_bytes().startswith(custom_before)
    assert custom.read_text().splitlines()[-1].startswith(f"!include {env.fragment}")

    config = _show_config(real_nix)
    assert "http://127.0.0.1:41234" in config["substituters"].split()
    assert config["netrc-file"] == str(env.netrc)
    assert config["keep-outputs"] == "true"
    # the netrc Determinate's nix.conf named is merged, so FlakeHub keeps working
    assert NetrcEntry("api.flakehub.com", "flakehub", "fh-token") in parse_netrc(
        env.netrc.read_text()
    )
    assert not env.setup.apply(_state())

    assert env.setup.remove() is True
    assert (env.main.read_bytes(), custom.read_bytes()) == (main_before, custom_before)


def test_determinate_layout_without_nix_custom_conf_creates_and_removes_it(
    tmp_path: Path,
) -> None:
    env = Env(tmp_path)
    env.main.write_text("sandbox = true\n!include nix.custom.conf\n")
    before = env.main.read_bytes()
    assert env.setup.apply(_state()).in_effect
    assert (tmp_path / "nix.custom.conf").exists() and env.main.read_bytes() == before
    assert env.setup.remove() is True
    assert not (tmp_path / "nix.custom.conf").exists() and env.main.read_bytes() == before


def test_a_setting_after_the_include_that_undoes_it_is_reported(
    real_nix: RealNix, env: Env
) -> None:
    env.main.write_text(
        env.main.read_text() + f"!include {env.fragment}\nsubstituters = https://other\n"
    )
    result = env.setup.apply(_state())
    assert result.problem is not None
    assert f"`substituters = ...` in {env.main}:" in result.problem
    assert "move `!include" in result.problem
    assert "http://127.0.0.1:41234" not in _show_config(real_nix)["substituters"]


def test_nixd_mode_ignores_the_determinate_layout(tmp_path: Path) -> None:
    env = Env(tmp_path, managed_by="nixd")
    env.main.write_text("!include nix.custom.conf\n")
    result = env.setup.apply(_state())
    assert result.in_effect and result.include_file == str(env.main)
    assert not (tmp_path / "nix.custom.conf").exists()


def test_include_loops_and_deep_chains_end(tmp_path: Path) -> None:
    env = Env(tmp_path, managed_by="external")
    env.main.write_text("include a.conf\n")
    (tmp_path / "a.conf").write_text("include nix.conf\n")  # a loop Nix itself would not end
    assert not env.setup.apply(_state()).in_effect


def test_state_repr_hides_secrets() -> None:
    shown = repr(_state())
    assert SECRET not in shown
    assert "token.one" not in shown
    assert "cache.example" in shown


def test_stale_temp_files_from_a_crash_are_swept(env: Env) -> None:
    stale = env.dir / f".{env.netrc.name}.0123456789ab.nixd-tmp"
    stale.write_bytes(b"machine 127.0.0.1 login nixd password half")
    env.setup.apply(_state())
    assert not stale.exists()


# --- end to end: Nix sends the proxy secret from the managed netrc -----------------------


class _CacheInfo(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        body = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def cache_info_server() -> Iterator[int]:
    _CacheInfo.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CacheInfo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_nix_authenticates_to_the_proxy_with_the_managed_netrc(
    real_nix: RealNix, env: Env, cache_info_server: int
) -> None:
    url = f"http://127.0.0.1:{cache_info_server}"
    (env.dir / "netrc").write_text(
        f"machine 127.0.0.1 login theirs password {'x' * 8}\ndefault login a password b\n"
    )
    env.setup.apply(_state(proxy_url=url))
    real_nix.run(
        ["nix", "store", "ping", "--store", url], store=False, env={"NIX_USER_CONF_FILES": ""}
    )
    expected = "Basic " + base64.b64encode(f"nixd:{SECRET}".encode()).decode()
    assert _CacheInfo.seen == [expected]
    assert os.stat(env.netrc).st_uid == os.geteuid()
