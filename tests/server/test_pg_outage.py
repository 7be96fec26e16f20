"""The PostgreSQL metadata database going away: contained, answered 503, then recovered.

The app in-process on PostgreSQL. Connections killed under it (a server restart, a
failover) cost a read nothing: the pool's broken connection is replaced and the read
tried once more. A database refusing connections is a 503 ``database unavailable`` for
the requests that need it, the process goes on, and once the database is back the
same requests succeed without a restart.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.pgcluster import PgCluster
from tests.server.appenv import HASH_A, Env, make_nar, upload


def _kill_connections(cluster: PgCluster, dbname: str) -> None:
    cluster.admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()"
    )


@pytest.mark.parametrize("metadata", ["postgresql"], indirect=True)
async def test_a_lost_database_answers_503_and_recovers(
    env: Env, pg_cluster: PgCluster, database: str
) -> None:
    dbname = urlsplit(database).path.lstrip("/")
    async with env.client(auth=env.member, basic=True) as c:
        r = await upload(c, "acme/app", HASH_A, make_nar(env.state.path / "n", b"outage\n"))
        assert r.status_code == 200, r.text
        assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 200

        _kill_connections(pg_cluster, dbname)
        for _ in range(3):
            assert (await c.get(f"/cache/{HASH_A}.narinfo")).status_code == 200

        pg_cluster.admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            _kill_connections(pg_cluster, dbname)
            r = await c.get(f"/cache/{HASH_A}.narinfo")
            assert r.status_code == 503
            assert "database unavailable" in r.text
        finally:
            pg_cluster.admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        r = await c.get(f"/cache/{HASH_A}.narinfo")
        assert r.status_code == 200, r.text
