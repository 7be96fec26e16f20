"""Config parsing: typed sections, defaults, and errors that name file:key."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import httpx
import pytest

from nixd.auth.token import TokenMethod
from nixd.daemon.config import DEFAULT_CONTROL_SOCKET, Config, load_config
from nixd.daemon.main import Daemon
from nixd.daemon.state import LoginState
from nixd.errors import ConfigError

KEY = "6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
FULL = """
[daemon]
control_socket = "{d}/nixd.sock"
state_dir = "{d}/state"
control_group = "root"
shutdown_grace = 3

[server]
url = "http://127.0.0.1:8080/"
trusted_keys = ["extra-1:{key}"]

[proxy]
listen = "127.0.0.1:0"
store_dir = "{d}/store"
store_max_bytes = 1048576
negative_ttl = 5
prefetch = false
prefetch_concurrency = 4
offline_after = 3
offline_probe = 1.5
token_wait = 0

[[proxy.upstreams]]
url = "https://cache.nixos.org"
priority = 40
trusted_keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]

[[proxy.upstreams]]
url = "https://private.example/cache"
auth = "netrc"
netrc_file = "{d}/private-netrc"

[nix]
nix_conf = "{d}/nix.conf"
fragment = "{d}/nixd.conf"
netrc = "{d}/netrc"
additional_netrc_sources = ["{d}/user-netrc"]
restart_nix_daemon = false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL.format(d=tmp_path, key=KEY)))
    assert config.path == str(tmp_path / "config.toml")
    assert config.daemon.control_socket == f"{tmp_path}/nixd.sock"
    assert config.daemon.control_group == "root"
    assert config.daemon.shutdown_grace == 3.0
    assert config.server.url == "http://127.0.0.1:8080"
    assert config.server.trusted_keys == (f"extra-1:{KEY}",)
    assert (config.proxy.listen_host, config.proxy.listen_port) == ("127.0.0.1", 0)
    assert config.proxy.negative_ttl == 5.0
    assert (config.proxy.prefetch, config.proxy.prefetch_concurrency) == (False, 4)
    assert (config.proxy.offline_after, config.proxy.offline_probe) == (3, 1.5)
    assert config.proxy.token_wait == 0.0
    assert [u.url for u in config.proxy.upstreams] == [
        "https://cache.nixos.org",
        "https://private.example/cache",
    ]
    assert config.proxy.upstreams[0].auth == "none"
    assert config.proxy.upstreams[1].auth == "netrc"
    assert config.proxy.upstreams[1].netrc_file == f"{tmp_path}/private-netrc"
    assert config.nix.additional_netrc_sources == (f"{tmp_path}/user-netrc",)
    assert config.nix.restart_nix_daemon is False
    assert config.state_file == f"{tmp_path}/state/state.json"
    assert config.proxy_secret_file == f"{tmp_path}/state/proxy-secret"


def test_empty_config_is_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.daemon.control_socket == DEFAULT_CONTROL_SOCKET
    assert config.nix.nix_conf == "/etc/nix/nix.conf"
    assert config.proxy.upstreams == ()
    assert config == Config(path=config.path)


def test_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    with pytest.raises(AttributeError):
        config.daemon.state_dir = "/tmp"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("[daemon]\ncontrol_sockett = '/x'\n", "daemon.control_sockett", "unknown key"),
        ("[deamon]\n", "deamon", "unknown key"),
        ("[daemon]\nstate_dir = 'relative'\n", "daemon.state_dir", "absolute path"),
        ("[daemon]\nshutdown_grace = 'soon'\n", "daemon.shutdown_grace", "expected float"),
        ("[daemon]\ncontrol_group = 'no-such-group-x'\n", "daemon.control_group", "no such group"),
        ("[daemon]\nlog_level = 'loud'\n", "daemon.log_level", "must be one of"),
        ("[server]\nurl = 'ftp://x'\n", "server.url", "http"),
        ("[server]\ntrusted_keys = [1]\n", "server.trusted_keys[0]", "expected a string"),
        ("[server]\ntrusted_keys = ['k:not base64!']\n", "server.trusted_keys[0]", "base64"),
        (
            "[[proxy.upstreams]]\nurl = 'http://a'\nauth = 'netrc'\n",
            "proxy.upstreams[0].netrc_file",
            "required",
        ),
        ("[proxy]\nlisten = 'localhost'\n", "proxy.listen", "HOST:PORT"),
        ("[proxy]\nstore_max_bytes = 0\n", "proxy.store_max_bytes", "positive"),
        ("[proxy]\nstore_max_bytes = true\n", "proxy.store_max_bytes", "expected int"),
        ("[proxy]\nprefetch_concurrency = 0\n", "proxy.prefetch_concurrency", "between 1 and"),
        ("[proxy]\nprefetch = 'yes'\n", "proxy.prefetch", "expected bool"),
        ("[proxy]\noffline_after = 0\n", "proxy.offline_after", "between 1 and"),
        ("[proxy]\noffline_probe = 0\n", "proxy.offline_probe", "more than 0"),
        ("[proxy]\noffline_probe = inf\n", "proxy.offline_probe", "at most 3600"),
        ("[proxy]\ntoken_wait = -1\n", "proxy.token_wait", "between 0 and"),
        ("[proxy]\ntoken_wait = nan\n", "proxy.token_wait", "between 0 and"),
        ("[[proxy.upstreams]]\npriority = 1\n", "proxy.upstreams[0].url", "required"),
        (
            "[[proxy.upstreams]]\nurl = 'http://a'\n"
            "[[proxy.upstreams]]\nurl = 'http://b'\nauthh = 1\n",
            "proxy.upstreams[1].authh",
            "unknown key",
        ),
        (
            "[[proxy.upstreams]]\nurl = 'http://a'\nauth = 'magic'\n",
            "proxy.upstreams[0].auth",
            "one of",
        ),
        ("[nix]\nrestart_nix_daemon = 'yes'\n", "nix.restart_nix_daemon", "expected bool"),
        (
            "[nix]\nadditional_netrc_sources = ['x']\n",
            "nix.additional_netrc_sources[0]",
            "absolute",
        ),
        ("daemon = 3\n", "daemon", "expected dict"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{where}:"), message
    assert what in message


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_a_missing_file_may_mean_the_defaults(tmp_path: Path) -> None:
    """What the daemon does: every section is optional, so is the file."""
    absent = tmp_path / "absent.toml"
    config = load_config(absent, missing_ok=True)
    assert config == Config(path=str(absent))
    assert config.nix.nix_conf_managed_by == "auto"
    assert load_config(write(tmp_path, ""), missing_ok=True).nix == config.nix


@pytest.mark.parametrize("value", ["auto", "nixd", "external"])
def test_nix_conf_managed_by(tmp_path: Path, value: str) -> None:
    config = load_config(write(tmp_path, f'[nix]\nnix_conf_managed_by = "{value}"\n'))
    assert config.nix.nix_conf_managed_by == value


def test_nix_conf_managed_by_refuses_other_values(tmp_path: Path) -> None:
    path = write(tmp_path, '[nix]\nnix_conf_managed_by = "nixos"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:nix.nix_conf_managed_by: one of auto,"):
        load_config(path)


BAD_FILES = {
    "non-utf8-byte": ("[daemon]\nlog_level = 'info'\n# caf\xe9\n".encode("latin-1"), "not UTF-8"),
    "ipv6-url-unclosed": (b'[[proxy.upstreams]]\nurl = "http://[::1"\n', "proxy.upstreams[0].url"),
    "server-url-unclosed": (b'[server]\nurl = "http://[::1"\n', "server.url"),
    "upstream-port-99999": (b'[[proxy.upstreams]]\nurl = "http://h:99999"\n', "Port out of range"),
    "listen-port-99999": (b'[proxy]\nlisten = "127.0.0.1:99999"\n', "proxy.listen"),
    "listen-port-arabic-digit": ('[proxy]\nlisten = "127.0.0.1:\u0663"\n'.encode(), "proxy.listen"),
    "arrays-2000-deep": (b"x = " + b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
    "tables-2000-deep": (b"x = " + b"{a = " * 2000 + b"1" + b"}" * 2000 + b"\n", "TOML"),
    "integer-of-5000-digits": (b"[proxy]\nstore_max_bytes = " + b"9" * 5000 + b"\n", "TOML"),
    "nul-in-a-path": (b'[nix]\nnetrc = "/etc/a\\u0000b"\n', "NUL"),
    "nul-in-a-group": (b'[daemon]\ncontrol_group = "a\\u0000b"\n', "no such group"),
    "url-credentials-with-netrc": (
        b'[[proxy.upstreams]]\nurl = "http://u:pw@h"\nauth = "netrc"\nnetrc_file = "/n"\n',
        "pick one",
    ),
    "foreign-urls-unknown": (
        b'[[proxy.upstreams]]\nurl = "http://h"\nforeign_urls = "sometimes"\n',
        "proxy.upstreams[0].foreign_urls",
    ),
    "too-large": (b"# " + b"x" * (2 << 20) + b"\n", "larger than"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_bad_file_is_a_config_error(tmp_path: Path, name: str) -> None:
    data, what = BAD_FILES[name]
    path = tmp_path / "config.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)), info.value
    assert what in str(info.value)
    assert "pw" not in str(info.value)


def test_foreign_urls_and_url_credentials_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[[proxy.upstreams]]\nurl = "https://ci:s3cret@cache.example/"\n'
            'foreign_urls = "anonymous"\n',
        )
    )
    upstream = config.proxy.upstreams[0]
    assert upstream.foreign_urls == "anonymous"
    assert upstream.url == "https://ci:s3cret@cache.example"


def test_the_readme_config_example_loads(tmp_path: Path) -> None:
    """The README's /etc/nixd/config.toml shows every section; it must be a valid config."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Configuration", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    group = grp.getgrgid(os.getgid()).gr_name  # the example's "wheel" may not exist here
    path = tmp_path / "config.toml"
    path.write_text(block.replace('control_group = "wheel"', f'control_group = "{group}"'))
    config = load_config(str(path))
    assert config.proxy.listen_port == 6493 and len(config.proxy.upstreams) == 1
    sections = {
        line.split("#")[0].strip().strip("[]")
        for line in block.splitlines()
        if line.startswith("[")
    }
    assert sections == {"daemon", "server", "proxy", "proxy.upstreams", "nix", "push"}
    assert config.push.to == "acme/app" and config.nix.nix_conf_managed_by == "auto"


async def test_the_offline_and_token_settings_reach_every_upstream(tmp_path: Path) -> None:
    """[proxy] offline_after, offline_probe and token_wait are what the proxy gets for
    each upstream, the configured ones and the server's own (logged in)."""
    config = load_config(write(tmp_path, FULL.format(d=tmp_path, key=KEY)))
    async with httpx.AsyncClient() as http:
        daemon = Daemon(config, http)
        daemon.login_state = LoginState(
            server_url="http://127.0.0.1:8080",
            method=TokenMethod("a-token"),
            pinned_keys=(f"k-1:{KEY}",),
        )
        upstreams = daemon.proxy_config().upstreams
    assert [u.auth for u in upstreams] == ["nixd", "none", "netrc"]
    for u in upstreams:
        assert (u.offline_after, u.offline_probe, u.token_wait) == (3, 1.5, 0.0)


async def test_the_flake_routes_follow_the_login(tmp_path: Path) -> None:
    """[proxy] flakes: on by default, to the logged-in server (none before a login);
    flakes = false turns the routes off (the secret is needed, as for everything else)."""
    config = load_config(write(tmp_path, "[proxy]\nflakes_max_bytes = 4096\ntoken_wait = 1\n"))
    assert config.proxy.flakes is True
    async with httpx.AsyncClient() as http:
        daemon = Daemon(config, http)
        flakes = daemon.proxy_config().flakes
        assert flakes is not None and flakes.server_url is None  # not logged in: 503s
        daemon.login_state = LoginState(
            server_url="http://127.0.0.1:8080",
            method=TokenMethod("a-token"),
            pinned_keys=(f"k-1:{KEY}",),
        )
        flakes = daemon.proxy_config().flakes
        assert flakes is not None
        assert (flakes.server_url, flakes.max_bytes, flakes.token_wait) == (
            "http://127.0.0.1:8080",
            4096,
            1.0,
        )
        off = load_config(write(tmp_path, "[proxy]\nflakes = false\n"))
        assert daemon.proxy_config(off).flakes is None
    with pytest.raises(ConfigError, match=r"proxy\.flakes_max_bytes"):
        load_config(write(tmp_path, "[proxy]\nflakes_max_bytes = 0\n"))
    with pytest.raises(ConfigError, match=r"proxy\.flakes"):
        load_config(write(tmp_path, '[proxy]\nflakes = "yes"\n'))
