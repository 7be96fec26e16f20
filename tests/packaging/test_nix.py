"""The flake's Nix files, evaluated by the real Nix 2.8 without nixpkgs or network.

What runs here: every .nix file parses; the TOML the modules write (packaging/nix/
render.nix) loads with nixd's own config parsers and round-trips arbitrary data; the
Python dependencies the package asks nixpkgs for are exactly pyproject's (by an
independent PEP 508 reading); the NixOS units are the shipped systemd units and the
nix-darwin dictionary is the shipped plist. What cannot run offline: building the
package and evaluating the modules against a real nixpkgs (lib, types, the module system).
"""

from __future__ import annotations

import json
import plistlib
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nixd.daemon.config import Config, ProxySection, load_config, parse_config
from nixd.server.config import ServerConfig
from tests.realnix import RealNix, nix_available

REPO = Path(__file__).resolve().parents[2]
NIXDIR = REPO / "packaging" / "nix"

pytestmark = pytest.mark.realnix


@pytest.fixture(scope="module")
def nix(tmp_path_factory: pytest.TempPathFactory) -> RealNix:
    if not nix_available():
        pytest.fail("the real `nix` is required (apt-get install nix-bin)")
    return RealNix.create(tmp_path_factory.mktemp("nix"), "extra-experimental-features = flakes\n")


def nix_eval(nix: RealNix, expr: str, *, check: bool = True) -> Any:
    """`nix eval --impure --json --expr EXPR` as Python, or the error text (check=False)."""
    proc = nix.run(["nix", "eval", "--impure", "--json", "--expr", expr], check=check)
    if proc.returncode != 0:
        return proc.stderr.decode()
    return json.loads(proc.stdout)


def render(nix: RealNix, data: Any, tmp: Path, *, check: bool = True) -> Any:
    tmp.write_text(json.dumps(data))
    return nix_eval(
        nix,
        f"import {NIXDIR}/render.nix (builtins.fromJSON (builtins.readFile {tmp}))",
        check=check,
    )


def test_every_nix_file_parses(nix: RealNix) -> None:
    files = [REPO / "flake.nix", *sorted(NIXDIR.glob("*.nix"))]
    assert len(files) >= 8
    for f in files:
        nix.run(["nix-instantiate", "--parse", str(f)], store=False)


DAEMON_SETTINGS: list[dict[str, Any]] = [
    {},
    {"server": {"url": "https://cache.example.org"}},
    {
        "daemon": {"log_level": "debug", "shutdown_grace": 2.5, "state_dir": "/var/lib/x"},
        "server": {
            "url": "https://cache.example.org",
            "trusted_keys": ["cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="],
        },
        "proxy": {
            "listen": "[::1]:41234",
            "store_max_bytes": 1 << 40,
            "negative_ttl": 0,
            "upstreams": [
                {
                    "url": "https://cache.nixos.org",
                    "priority": 40,
                    "trusted_keys": [
                        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
                    ],
                },
                {"url": "https://private.example", "auth": "netrc", "netrc_file": "/etc/n"},
            ],
        },
        "nix": {"restart_nix_daemon": False, "additional_netrc_sources": ["/root/.netrc"]},
    },
]


@pytest.mark.parametrize("data", DAEMON_SETTINGS)
def test_rendered_daemon_config_loads_as_the_settings(
    nix: RealNix, tmp_path: Path, data: dict[str, Any]
) -> None:
    text = render(nix, data, tmp_path / "in.json")
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    assert tomllib.loads(text) == data
    assert load_config(conf) == parse_config(data, str(conf))


def test_the_modules_default_settings_load_as_nixds_defaults(nix: RealNix, tmp_path: Path) -> None:
    """What services.nixd renders when nothing is set: the declared options' defaults."""
    listen = nix_eval(nix, f"(import {NIXDIR}/units.nix).defaultProxyListen")
    module_defaults = {
        "server": {"url": None},
        "proxy": {"listen": listen, "upstreams": []},
        "nix": {"fragment": "/etc/nix/nixd.conf"},
    }
    conf = tmp_path / "config.toml"
    conf.write_text(render(nix, module_defaults, tmp_path / "in.json"))
    assert load_config(conf) == Config(path=str(conf))


def test_rendered_null_means_the_default(nix: RealNix, tmp_path: Path) -> None:
    text = render(nix, {"server": {"url": None}, "proxy": {"listen": None}}, tmp_path / "in.json")
    assert tomllib.loads(text) == {"server": {}, "proxy": {}}


def test_rendered_server_config_loads(nix: RealNix, tmp_path: Path) -> None:
    data = {
        "server": {"listen": ["0.0.0.0:8080", "[::]:8080"], "graceful_timeout": 5.0},
        "storage": {"database": "/srv/db/server.db", "max_upload_bytes": 1 << 34},
        "device": {"public_url": "https://cache.example.org", "backoff": 0.5},
        "github": [{"org": "main", "audience": "https://cache.example.org", "owner_ids": ["1"]}],
        "aws": [{"org": "main", "audience": "a", "accounts": ["123456789012"]}],
    }
    text = render(nix, data, tmp_path / "in.json")
    assert tomllib.loads(text) == data
    loaded = ServerConfig.from_toml(text, state_dir=tmp_path)
    assert loaded.server.listen == ("0.0.0.0:8080", "[::]:8080")
    assert loaded.storage.max_upload_bytes == 1 << 34
    assert loaded.device.backoff == 0.5
    assert loaded.github[0].owner_ids == ("1",)
    assert loaded.aws[0].accounts == ("123456789012",)


def test_render_refuses_a_float_it_cannot_write_exactly(nix: RealNix, tmp_path: Path) -> None:
    err = render(nix, {"daemon": {"shutdown_grace": 1 / 3}}, tmp_path / "in.json", check=False)
    assert "daemon.shutdown_grace: the float" in err
    assert "cannot be written exactly" in err


_text = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=12)
_scalar = (
    _text
    | st.integers(-(2**63), 2**63 - 1)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.5, 10.0, 2.25, -1.5, 1e-05, 1e20])
)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
_table = st.recursive(
    st.dictionaries(_text, _value, max_size=4),
    lambda inner: st.dictionaries(
        _text, _value | inner | st.lists(inner, min_size=1, max_size=2), max_size=4
    ),
    max_leaves=10,
)


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=_table)
def test_render_round_trips_through_tomllib(nix: RealNix, tmp_path: Path, data: Any) -> None:
    out = render(nix, data, tmp_path / "in.json", check=False)
    if isinstance(out, str) and "cannot be written exactly" in out and out.startswith("error"):
        assert _floats(data)  # only a float may be refused
        return
    assert tomllib.loads(out) == data


def _pyproject_deps(platform: str, extras: list[str]) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for group in extras:
        reqs += project.get("optional-dependencies", {}).get(group, [])
    env = {"sys_platform": platform, "platform_system": platform.capitalize(), "extra": ""}
    names = set()
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            names.add(str(canonicalize_name(req.name)))
    return names


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_package_asks_nixpkgs_for_exactly_pyprojects_dependencies(
    nix: RealNix, platform: str
) -> None:
    deps = nix_eval(
        nix,
        f"""import {NIXDIR}/python-deps.nix {{
          pyproject = builtins.fromTOML (builtins.readFile {REPO}/pyproject.toml);
          platform = "{platform}";
          extras = [ "aws" ];
        }}""",
    )
    assert {d["name"] for d in deps} == _pyproject_deps(platform, ["aws"])
    assert all(d["candidates"] for d in deps)


def test_package_deps_stop_at_a_name_without_a_nixpkgs_mapping(nix: RealNix) -> None:
    err = nix_eval(
        nix,
        f"""import {NIXDIR}/python-deps.nix {{
          pyproject = {{ project.dependencies = [ "no-such-thing>=1" ]; }};
          platform = "linux";
        }}""",
        check=False,
    )
    assert "no nixpkgs name for the Python dependency `no-such-thing`" in err


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m[1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def test_nixos_units_are_the_shipped_units(nix: RealNix) -> None:
    units = nix_eval(
        nix,
        f"(import {NIXDIR}/units.nix).systemd "
        '{ nixd = "/pkg/bin/nixd"; kill = "/pkg/bin/kill"; }',
    )
    shipped = _parse_unit((REPO / "systemd/nixd.service").read_text())
    service = units["services"]["nixd"]
    expected = dict(shipped["Service"])
    expected["ExecStart"] = [
        re.sub(r"^\S*/nixd ", "/pkg/bin/nixd ", v) for v in expected["ExecStart"]
    ]
    expected["ExecReload"] = [
        v.replace("/bin/kill ", "/pkg/bin/kill ") for v in expected.get("ExecReload", [])
    ]
    got = {k: _as_list(v) for k, v in service["serviceConfig"].items()}
    assert got == expected
    unit = shipped["Unit"]
    assert service["description"] == unit["Description"][0]
    for key in ("After", "Wants", "Before", "Requires"):
        assert service[key.lower()] == " ".join(unit.get(key, [])).split()
    assert service["wantedBy"] == shipped["Install"]["WantedBy"]

    for name, file in (("nixd", "nixd.socket"), ("nixd-proxy", "nixd-proxy.socket")):
        shipped = _parse_unit((REPO / "systemd" / file).read_text())
        socket = units["sockets"][name]
        assert socket["listenStreams"] == shipped["Socket"].pop("ListenStream")
        assert {k: _as_list(v) for k, v in socket["socketConfig"].items()} == shipped["Socket"]
        assert socket["description"] == shipped["Unit"]["Description"][0]
        assert socket["wantedBy"] == shipped["Install"]["WantedBy"]


def test_nixos_server_units_are_the_shipped_units(nix: RealNix) -> None:
    units = nix_eval(
        nix,
        f'(import {NIXDIR}/units.nix).server {{ execStart = "/pkg/bin/nixd-server serve /srv/c"; '
        'stateDir = "/srv/c"; user = "cache"; group = "cache"; '
        'listen = [ "0.0.0.0:8080" "[::]:8080" ]; }',
    )
    shipped = _parse_unit((REPO / "systemd/nixd-server.service").read_text())
    service = units["services"]["nixd-server"]
    expected = dict(shipped["Service"])
    for key in ("StateDirectory", "StateDirectoryMode"):
        del expected[key]  # the module's stateDir may be anywhere: tmpfiles + ReadWritePaths
    expected |= {
        "ExecStart": ["/pkg/bin/nixd-server serve /srv/c"],
        "User": ["cache"],
        "Group": ["cache"],
        "ReadWritePaths": ["/srv/c"],
    }
    got = {k: _as_list(v) for k, v in service["serviceConfig"].items()}
    assert got == expected
    assert got["Type"] == ["notify"] and got["NotifyAccess"] == ["main"]
    unit = shipped["Unit"]
    for key in ("After", "Wants", "Requires"):
        assert service[key.lower()] == " ".join(unit.get(key, [])).split()
    socket_unit = _parse_unit((REPO / "systemd/nixd-server.socket").read_text())
    socket = units["sockets"]["nixd-server"]
    assert socket["listenStreams"] == ["0.0.0.0:8080", "[::]:8080"]
    rest = dict(socket_unit["Socket"])
    del rest["ListenStream"]
    assert {k: _as_list(v) for k, v in socket["socketConfig"].items()} == rest


def test_default_proxy_address_is_nixds_default(nix: RealNix) -> None:
    listen = nix_eval(nix, f"(import {NIXDIR}/units.nix).defaultProxyListen")
    p = ProxySection()
    assert listen == f"{p.listen_host}:{p.listen_port}"
    assert nix_eval(nix, f"(import {NIXDIR}/units.nix).configFile") == "/etc/nixd/config.toml"


def test_nix_darwin_daemon_is_the_shipped_plist(nix: RealNix) -> None:
    got = nix_eval(
        nix,
        f"""let u = import {NIXDIR}/units.nix; in
        u.launchd {{ nixd = "/usr/local/bin/nixd"; proxyListen = u.defaultProxyListen; }}""",
    )
    with open(REPO / "launchd/org.nixd.daemon.plist", "rb") as f:
        assert got == plistlib.load(f)


def test_nix_darwin_proxy_socket_follows_the_settings(nix: RealNix) -> None:
    got = nix_eval(
        nix,
        f'(import {NIXDIR}/units.nix).launchd {{ nixd = "/x"; proxyListen = "[::1]:4000"; }}',
    )
    assert got["Sockets"]["proxy"] == {
        "SockNodeName": "::1",
        "SockServiceName": "4000",
        "SockType": "stream",
        "SockFamily": "IPv6",
    }


# A stand-in for nixpkgs with just what flake.nix and package.nix touch: lib functions
# (fileset.toSource checks that every file it is given exists), a stdenv, and Python
# packages that are fake derivations named as in nixpkgs. buildPythonApplication keeps
# its arguments, so the test can read what the package would be built from.
STUB_NIXPKGS = """\
{
  outputs = { self }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
      lib = {
        inherit genAttrs;
        mkDefault = x: x;
        importTOML = p: builtins.fromTOML (builtins.readFile p);
        findFirst = pred: default: xs:
          let m = builtins.filter pred xs; in if m == [ ] then default else builtins.head m;
        concatStringsSep = builtins.concatStringsSep;
        concatMap = builtins.concatMap;
        unique = builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
        fileset = {
          unions = files: files;
          toSource = { root, fileset }:
            if builtins.all builtins.pathExists fileset
            then { inherit root; files = map toString fileset; }
            else throw "fileset: a file is missing";
        };
        licenses.mit = "MIT";
        platforms = { linux = [ "x86_64-linux" ]; darwin = [ "x86_64-darwin" ]; };
      };
      fake = system: name: derivation {
        inherit name system; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
      } // { pname = name; };
      pkgsFor = system: rec {
        stdenv.hostPlatform = {
          inherit system; isDarwin = builtins.match ".*-darwin" system != null;
        };
        python3Packages = genAttrs (builtins.fromJSON ''@NAMES@'') (fake system) // {
          buildPythonApplication = args:
            fake system "${args.pname}-${args.version}" // { inherit args; inherit (args) meta; };
        };
        callPackage = fn: args: import fn ({ inherit lib stdenv python3Packages; } // args);
      };
    in { inherit lib; legacyPackages = genAttrs systems pkgsFor; };
}
"""


def test_flake_checks_with_a_stub_nixpkgs(nix: RealNix, tmp_path: Path) -> None:
    """`nix flake check --no-build` and the package's inputs, nixpkgs replaced by a stub."""

    names = {c for d in _mapped_deps(nix) for c in d["candidates"][:1]} | {"setuptools"}
    stub = tmp_path / "nixpkgs"
    stub.mkdir()
    (stub / "flake.nix").write_text(STUB_NIXPKGS.replace("@NAMES@", json.dumps(sorted(names))))
    flake = tmp_path / "flake"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (flake / name).parent.mkdir(parents=True, exist_ok=True)
            (flake / name).write_bytes((REPO / name).read_bytes())
    common = ["--no-write-lock-file", "--override-input", "nixpkgs", f"path:{stub}"]
    nix.run(["nix", "flake", "check", "--no-build", *common, f"path:{flake}"])

    def attr(path: str, apply: str | None = None) -> Any:
        extra = ["--apply", apply] if apply else []
        proc = nix.run(["nix", "eval", "--json", *common, f"path:{flake}#{path}", *extra])
        return json.loads(proc.stdout)

    for system, platform in (("x86_64-linux", "linux"), ("aarch64-darwin", "darwin")):
        package = f"packages.{system}.default"
        deps = attr(f"{package}.args.dependencies", "map (d: d.pname)")
        assert set(deps) == _pyproject_deps(platform, ["aws"])
        assert attr(f"{package}.args.pname") == "nixd"
        assert attr(f"{package}.meta.mainProgram") == "nixd"
        sources = attr(f"{package}.args.src.files", "map baseNameOf")
        assert sorted(sources) == ["LICENSE", "README.md", "nixd", "pyproject.toml"]
    for output in ("nixosModules.default", "darwinModules.default"):
        assert attr(output, "builtins.isFunction") is True


def _mapped_deps(nix: RealNix) -> list[dict[str, Any]]:
    return [
        d
        for platform in ("linux", "darwin")
        for d in nix_eval(
            nix,
            f"""import {NIXDIR}/python-deps.nix {{
              pyproject = builtins.fromTOML (builtins.readFile {REPO}/pyproject.toml);
              platform = "{platform}";
              extras = [ "aws" ];
            }}""",
        )
    ]
