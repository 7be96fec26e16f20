"""Server config: the defaults ``init`` writes load back; every mistake names file:key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixd.errors import ConfigError
from nixd.server.config import ServerConfig, render_default


def test_default_config_round_trips(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(render_default("127.0.0.1:0"))
    config = ServerConfig.load(tmp_path)
    assert config.server.listen == ("127.0.0.1:0",)
    assert config.audit.durable_reads is True
    assert config.database_path == tmp_path / "server.db"
    assert config.address_path == tmp_path / "run" / "address"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[server]\nlisten = [1]\n", "config.toml:server.listen: must be a list of strings"),
        ("[server]\nport = 1\n", "config.toml:server.port: unknown key"),
        ("[srever]\n", "config.toml:srever: unknown section"),
        ("[audit]\ndurable_reads = 1\n", "config.toml:audit.durable_reads: must be true or false"),
        ("[tokens]\naccess_ttl = 0\n", "config.toml:tokens.access_ttl: must be positive"),
        ("[tokens]\naccess_ttl = true\n", "config.toml:tokens.access_ttl: must be an integer"),
        ("[storage]\nzstd_level = 99\n", "config.toml:storage.zstd_level"),
        ("[server\n", "config.toml:"),
    ],
)
def test_mistakes_name_file_and_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServerConfig.from_toml(text, state_dir=Path("/s"), source="config.toml")
    assert where in str(err.value)


def test_missing_config_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nixd-server init"):
        ServerConfig.load(tmp_path / "nope")
