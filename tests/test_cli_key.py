"""`nixd key` as a user runs it, with its keys used by the real Nix."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

from nixd.cli import main
from nixd.nix.narinfo import NarInfo
from nixd.nix.signing import PublicKey, SecretKey
from tests.nix.test_binary_cache import build_pair, path_info
from tests.realnix import RealNix


def nixd(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``nixd ARGS`` in this process (fast) and capture what it prints."""
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO(input or "")
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        mock.patch.object(sys, "stdin", stdin),
    ):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["nixd", *args], code, out.getvalue(), err.getvalue())


def nixd_process(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``nixd`` entry point as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "nixd.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_generate_then_public() -> None:
    gen = nixd("key", "generate", "cache.example.org-1")
    assert gen.returncode == 0, gen.stderr
    secret = gen.stdout
    assert secret.endswith("\n") and secret.count("\n") == 1
    key = SecretKey.parse(secret)
    assert key.name == "cache.example.org-1"
    pub = nixd("key", "public", input=secret)
    assert pub.returncode == 0, pub.stderr
    assert PublicKey.parse(pub.stdout) == key.public()
    assert pub.stdout == key.public().render() + "\n"
    # Two runs make two different keys.
    assert SecretKey.parse(nixd("key", "generate", "cache.example.org-1").stdout).render() != (
        key.render()
    )


def test_generate_to_files(tmp_path: Path) -> None:
    sk, pk = tmp_path / "secret.key", tmp_path / "public.key"
    gen = nixd("key", "generate", "k-1", "--secret-out", str(sk), "--public-out", str(pk))
    assert gen.returncode == 0, gen.stderr
    assert stat.S_IMODE(os.stat(sk).st_mode) == 0o600
    key = SecretKey.parse(sk.read_text())
    # With the secret in a file, stdout carries only the public key.
    assert gen.stdout == pk.read_text() == key.public().render() + "\n"
    assert nixd("key", "public", str(sk)).stdout == gen.stdout
    again = nixd("key", "generate", "k-1", "--secret-out", str(sk))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert SecretKey.parse(sk.read_text()).render() == key.render()  # untouched


def test_errors_are_one_line_without_secrets(tmp_path: Path) -> None:
    key = SecretKey.generate("k")
    secret_b64 = key.render().split(":", 1)[1]
    seed = base64.b64decode(secret_b64)[:32]
    mismatched = "k:" + base64.b64encode(seed + bytes(32)).decode()  # public half replaced
    for args, stdin, expected in (
        (["key", "public"], secret_b64, "no colon"),
        (["key", "public"], mismatched, "does not match its seed"),
        (["key", "public"], "k:" + secret_b64[:41], "base64"),
        (["key", "public"], "k:" + secret_b64[:40], "expected 64"),
        (["key", "public", str(tmp_path / "missing")], None, "No such file"),
        (["key", "generate", "bad name"], None, "whitespace"),
    ):
        proc = nixd(*args, input=stdin)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nixd: error: ")
        assert expected in proc.stderr, proc.stderr
        assert secret_b64[:16] not in proc.stderr
    # The installed entry point reports the same way.
    proc = nixd_process("key", "public", input=mismatched)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert (
        proc.stderr
        == "nixd: error: stdin: secret key 'k': its public half does not match its seed\n"
    )
    usage = nixd("key")
    assert usage.returncode == 2 and "generate" in usage.stderr


def test_help_explains_the_commands() -> None:
    for args in (["key", "--help"], ["key", "generate", "--help"], ["key", "public", "--help"]):
        proc = nixd(*args)
        assert proc.returncode == 0
        assert "nix key" in proc.stdout or "Nix" in proc.stdout


def test_keys_work_with_the_real_nix(real_nix: RealNix, tmp_path: Path) -> None:
    sk = tmp_path / "sk"
    sk.write_text(nixd_process("key", "generate", "nixd-made-1").stdout)
    ours = nixd_process("key", "public", str(sk)).stdout.strip()
    theirs = real_nix.run(
        ["nix", "key", "convert-secret-to-public"], input=sk.read_bytes(), store=None
    )
    assert theirs.stdout.decode() == ours

    # `nix store sign -k` takes the key file as we wrote it (final newline included).
    _, b = build_pair(real_nix)
    real_nix.run(["nix", "store", "sign", "-k", str(sk), b])
    info = path_info(real_nix, b)[b]
    (sig,) = info["signatures"]
    narinfo = NarInfo.parse(
        f"StorePath: {b}\nURL: x\nNarHash: {info['narHash']}\nNarSize: {info['narSize']}\n"
        f"References: {' '.join(r.rsplit('/', 1)[1] for r in info['references'])}\n"
        f"Sig: {sig}\n"
    )
    assert narinfo.verify([PublicKey.parse(ours)]) == ["nixd-made-1"]
    # And Nix itself trusts the signature under our public key.
    real_nix.run(
        [
            "nix",
            "store",
            "verify",
            "--sigs-needed",
            "1",
            "--no-contents",
            b,
            "--option",
            "trusted-public-keys",
            ours,
        ]
    )
    other = SecretKey.generate("nixd-made-1").public().render()
    refused = real_nix.run(
        [
            "nix",
            "store",
            "verify",
            "--sigs-needed",
            "1",
            "--no-contents",
            b,
            "--option",
            "trusted-public-keys",
            other,
        ],
        check=False,
    )
    assert refused.returncode != 0
