"""packaging/install.sh into a fake root: venv, links, units, default config, uninstall.

``--root DIR`` installs below DIR and runs no systemctl, so these tests install the real
package with its real dependencies (from the package index pip is configured with) and
run the installed ``nixd --version``, without touching the machine. Linux only: the
macOS branch (launchd plist, launchctl) cannot run here.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

import nixd
from nixd.daemon.config import Config, load_config, parse_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the Linux install path")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "install.sh"
PYTHON = getattr(sys, "_base_executable", sys.executable)
UNITS = ("nixd.socket", "nixd-proxy.socket", "nixd.service")
SERVER_UNITS = ("nixd-server.socket", "nixd-server.service")


def install(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--python", PYTHON, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"install.sh {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake root with nixd installed from this source tree."""
    root = tmp_path_factory.mktemp("root")
    proc = install("--root", root, "--server")
    assert f"installed nixd {nixd.__version__} in {root}/opt/nixd" in proc.stdout
    assert "the user nixd-server is not made" in proc.stdout  # --root makes no user
    assert "nixd-server init /var/lib/nixd-server --org ORG" in proc.stdout
    return root


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        path = REPO / os.fsdecode(name)
        if path.is_file():
            (src / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            (src / os.fsdecode(name)).write_bytes(path.read_bytes())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("nixd-*.whl")
    return built


def test_commands_are_linked_and_run(root: Path) -> None:
    for name in ("nixd", "nixd-server"):
        link = root / "usr/local/bin" / name
        assert link.is_symlink()
        assert os.readlink(link) == f"{root}/opt/nixd/bin/{name}"
        out = subprocess.run(
            [str(link), "--version"], capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.strip() == f"{name} {nixd.__version__}"
    assert (root / "opt/nixd/pyvenv.cfg").is_file()


def test_units_are_the_shipped_ones_naming_the_link(root: Path) -> None:
    for unit in UNITS + SERVER_UNITS:
        installed = (root / "etc/systemd/system" / unit).read_text()
        shipped = (REPO / "systemd" / unit).read_text()
        expected = re.sub(
            r"^ExecStart=\S*/(nixd|nixd-server) ",
            r"ExecStart=/usr/local/bin/\1 ",
            shipped,
            flags=re.M,
        )
        assert installed == expected
        assert stat.S_IMODE((root / "etc/systemd/system" / unit).stat().st_mode) == 0o644
    service = (root / "etc/systemd/system/nixd.service").read_text()
    assert "ExecStart=/usr/local/bin/nixd daemon --config /etc/nixd/config.toml" in service
    server = (root / "etc/systemd/system/nixd-server.service").read_text()
    assert "ExecStart=/usr/local/bin/nixd-server serve /var/lib/nixd-server" in server


def test_default_config_loads_as_the_defaults(root: Path) -> None:
    conf = root / "etc/nixd/config.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert load_config(conf) == Config(path=str(conf))


def test_default_config_names_only_real_keys_with_their_defaults() -> None:
    """Uncommenting every `# key = value` gives the defaults, but for the marked examples."""
    text = (REPO / "packaging/config.toml").read_text()
    uncommented = re.sub(r"^# (\[\[?[a-z.]+\]\]?|[a-z_]+ = .*)$", r"\1", text, flags=re.M)
    data = tomllib.loads(uncommented)
    assert data["daemon"].pop("control_group") == "wheel"  # an example: the group may not exist
    assert data["push"].pop("to") == "acme/app"  # an example
    assert data["push"].pop("store") == "/some/chroot/store"  # an example
    config = parse_config(data)
    defaults = Config()
    assert config.server.url == "https://cache.example.org"
    assert len(config.proxy.upstreams) == 1
    assert config.proxy.upstreams[0].url == "https://cache.nixos.org"
    config = replace(
        config,
        server=replace(config.server, url=None),
        proxy=replace(config.proxy, upstreams=()),
    )
    assert config == defaults
    # every key the parser knows appears in the file
    for section in ("daemon", "server", "proxy", "nix", "push"):
        keys = set(data.get(section, {}))
        known = {
            f
            for f in getattr(defaults, section).__dataclass_fields__
            if f not in ("listen_host", "listen_port", "upstreams")
        }
        if section == "proxy":
            known |= {"listen", "upstreams"}
        if section == "daemon":
            keys.add("control_group")
        if section == "push":
            keys |= {"to", "store"}
        assert keys == known, section


def test_again_from_a_wheel_keeps_the_config_then_uninstall(root: Path, wheel: Path) -> None:
    conf = root / "etc/nixd/config.toml"
    conf.write_text('[daemon]\nlog_level = "debug"\n')
    proc = install("--root", root, "--wheel", wheel)
    out = proc.stdout
    assert f"using the virtualenv {root}/opt/nixd" in out
    assert f"kept the existing {conf}" in out
    for unit in UNITS:
        assert f"{root}/etc/systemd/system/{unit} is up to date" in out
    assert "linked" not in out  # the links were right already
    assert conf.read_text() == '[daemon]\nlog_level = "debug"\n'
    version = subprocess.run(
        [str(root / "usr/local/bin/nixd"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"nixd {nixd.__version__}"

    proc = install("--root", root, "--uninstall")
    assert not (root / "opt/nixd").exists()
    for name in ("nixd", "nixd-server"):
        assert not (root / "usr/local/bin" / name).is_symlink()
    for unit in UNITS + SERVER_UNITS:  # the server's too, though this install did not name it
        assert not (root / "etc/systemd/system" / unit).exists()
    assert conf.read_text() == '[daemon]\nlog_level = "debug"\n'  # config stays
    assert "kept" in proc.stdout
    again = install("--root", root, "--uninstall")
    assert "nothing to remove" in again.stdout


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = install("--root", root, "--dry-run")
    assert not root.exists()
    out = proc.stdout
    assert re.search(r"would run: \S+ -m venv " + re.escape(f"{root}/opt/nixd"), out)
    assert "would run: ln -sfn" in out
    assert f"{root}/etc/systemd/system/nixd.service" in out
    assert f"install -m 0644 {REPO}/packaging/config.toml {root}/etc/nixd/config.toml" in out
    assert "would run: systemctl" not in out  # --root never talks to the machine's systemd


def test_prefix_and_bindir(tmp_path: Path) -> None:
    proc = install("--root", tmp_path, "--prefix", "/srv/nixd", "--bindir", "/bin2", "--dry-run")
    assert f"ln -sfn {tmp_path}/srv/nixd/bin/nixd {tmp_path}/bin2/nixd" in proc.stdout


def test_refuses_to_overwrite_what_it_did_not_make(tmp_path: Path) -> None:
    bindir = tmp_path / "usr/local/bin"
    bindir.mkdir(parents=True)
    (bindir / "nixd").write_text("#!/bin/sh\necho another nixd\n")
    proc = install("--root", tmp_path, check=False)
    assert proc.returncode == 1
    assert f"{bindir}/nixd exists and is not a link" in proc.stderr
    assert not (tmp_path / "opt").exists()  # refused before making anything

    prefix = tmp_path / "opt/nixd"
    prefix.mkdir(parents=True)
    (prefix / "data").write_text("not a venv")
    (bindir / "nixd").unlink()
    proc = install("--root", tmp_path, check=False)
    assert proc.returncode == 1
    assert "is not a virtualenv" in proc.stderr
    proc = install("--root", tmp_path, "--uninstall")
    assert (prefix / "data").exists()
    assert "is not a virtualenv: left alone" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option --bogus"),
        (["--source", ".", "--wheel", "x.whl"], "give --source or --wheel, not both"),
        (["--prefix", "relative"], "must be absolute paths"),
        (["--extras", "aws;rm"], "comma-separated list"),
        (["--wheel", "/nonexistent.whl"], "no wheel at /nonexistent.whl"),
        (["--python", "/nonexistent/python3"], "no /nonexistent/python3"),
    ],
)
def test_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    proc = install("--root", tmp_path / "r", *args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert not (tmp_path / "r").exists()
