"""``[[mirror]]``: upstream caches in the server config; every mistake names file:key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixd.errors import ConfigError
from nixd.nix.signing import SecretKey
from nixd.server.config import ServerConfig

KEY = SecretKey.generate("up-1").public().render()


def load(text: str) -> ServerConfig:
    return ServerConfig.from_toml(text, state_dir=Path("/s"), source="config.toml")


def test_mirror_entries_load_with_defaults() -> None:
    config = load(
        f'[[mirror]]\nname = "up"\nurl = "http://127.0.0.1:9/c/"\npublic_keys = ["{KEY}"]\n'
        'slices = ["acme/*", "other/app"]\n'
    )
    (m,) = config.mirror
    assert m.url == "http://127.0.0.1:9/c"  # the trailing slash is dropped
    assert (m.priority, m.max_concurrency, m.pull_through) == (100, 8, False)
    assert m.serves("ACME/anything") and m.serves("other/app")
    assert not m.serves("other/lib") and not m.serves("acmex/app")
    # No slices listed: nobody uses it.
    bare = load(f'[[mirror]]\nname = "up"\nurl = "https://c.example"\npublic_keys = ["{KEY}"]\n')
    assert not bare.mirror[0].serves("acme/app")


GOOD = f'name = "up"\nurl = "https://c.example"\npublic_keys = ["{KEY}"]\n'


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('name = "up"\nurl = "https://c.example"\n', "mirror[0].public_keys: list the keys"),
        ('name = "up"\nurl = "https://c.example"\npublic_keys = ["nope"]\n', "is not a key"),
        (f'name = ""\nurl = "https://c"\npublic_keys = ["{KEY}"]\n', "mirror[0].name"),
        (f'name = "up"\nurl = "file:///x"\npublic_keys = ["{KEY}"]\n', "mirror[0].url"),
        (f'name = "up"\nurl = "https://u:p@c"\npublic_keys = ["{KEY}"]\n', "no query"),
        (GOOD + 'slices = ["acme"]\n', "mirror[0].slices: 'acme' is not \"org/project\""),
        (GOOD + 'slices = ["*/*"]\n', "mirror[0].slices"),
        (GOOD + "max_concurrency = 0\n", "mirror[0].max_concurrency"),
        (GOOD + "requests_per_second = -1\n", "mirror[0].requests_per_second"),
        (GOOD + "timeout = 0\n", "mirror[0].timeout"),
        (GOOD + "priority = -3\n", "mirror[0].priority"),
        (GOOD + "pull_through = 1\n", "mirror[0].pull_through: must be true or false"),
        (GOOD + "colour = 1\n", "mirror[0].colour: unknown key"),
        (GOOD + "[[mirror]]\n" + GOOD, "mirror[1].name: 'up' names another mirror"),
    ],
)
def test_mirror_mistakes_name_the_key(extra: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        load("[[mirror]]\n" + extra)
    assert "config.toml:" in str(err.value)
    assert where in str(err.value)
