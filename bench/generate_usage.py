"""Fill a benchmark PostgreSQL database with usage records and their rollups.

A few hundred users with API keys, ~10 models routed to ~5 endpoints, and N
usage records (default 10 million) spread over the last `--days` days: mostly
successful requests, some errors, cancellations, rate-limit refusals and cache
hits, a few percent with fallback hops. The hourly rollups are computed from
those records in SQL, with the same arithmetic as `rebuild_rollups`. Every
endpoint is also probed at its interval over the same days, with the hourly
probe rollups. `--verify` checks both against the project's own rebuilds on
the data just generated, so use it with a small N.

Everything heavy runs inside PostgreSQL: records with one INSERT ... SELECT
over generate_series per chunk, indexes dropped during the load and rebuilt
after, rollups with one GROUP BY. It refuses any database whose name does not
contain "bench", and it empties the usage tables of the database it is given.

    createdb -h 127.0.0.1 -U postgres llmsite_bench
    .venv/bin/python bench/generate_usage.py \
        --database-url postgres://postgres@127.0.0.1:5432/llmsite_bench [--records N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

MODELS = [
    # name, input and output price per 1k tokens, share of traffic
    ("gpt-4o-mini", "0.000150", "0.000600", 30),
    ("gpt-4o", "0.002500", "0.010000", 12),
    ("llama-3.1-8b", "0.000050", "0.000080", 14),
    ("llama-3.1-70b", "0.000600", "0.000800", 10),
    ("mistral-small", "0.000200", "0.000600", 8),
    ("mistral-large", "0.002000", "0.006000", 5),
    ("qwen2.5-72b", "0.000400", "0.000400", 7),
    ("claude-haiku", "0.000250", "0.001250", 6),
    ("claude-sonnet", "0.003000", "0.015000", 5),
    ("text-embed-small", "0.000020", "0.000000", 3),
]
ENDPOINTS = ["openai-main", "azure-eu", "vllm-a", "vllm-b", "together"]


def bench_database_url(url: str) -> str:
    """The URL, if it is clearly a PostgreSQL benchmark database; else exit."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if parts.scheme not in {"postgres", "postgresql", "pgsql"}:
        sys.exit("refusing: --database-url must be a postgres:// URL")
    if "bench" not in name:
        sys.exit(f"refusing: database {name!r} does not look like a benchmark one")
    return url


def setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def dims_hash(user_id, api_key_id, model_name, endpoint_id, endpoint_name) -> str:
    # Imported lazily: Django must be set up first.
    from gateway.accounting.rollups import dimensions_hash

    return dimensions_hash(user_id, api_key_id, model_name, endpoint_id, endpoint_name)


def make_world(users: int, seed: int) -> list[tuple]:
    """Users, keys, endpoints, routes and budgets; returns the traffic combos."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from gateway.models import ApiKey, Budget, BudgetCounter, Endpoint, ModelRoute

    rng = random.Random(seed)
    user_model = get_user_model()
    now = timezone.now()
    people = user_model.objects.bulk_create(
        [user_model(username=f"bench-user-{i:04d}", password="!") for i in range(users)]
    )
    keys = ApiKey.objects.bulk_create(
        [
            ApiKey(
                user=person,
                name=f"key {n}",
                prefix=f"llms-b{i:04d}{n}",
                key_hash=hashlib.sha256(f"bench-{i}-{n}".encode()).hexdigest(),
            )
            for i, person in enumerate(people)
            for n in range(rng.choice([0, 1, 1, 2, 3]))
        ]
    )
    keys_of: dict[int, list[int]] = {}
    for key in keys:
        keys_of.setdefault(key.user_id, []).append(key.pk)
    endpoints = Endpoint.objects.bulk_create(
        [
            Endpoint(name=name, base_url=f"https://{name}.example.com/v1", priority=i)
            for i, name in enumerate(ENDPOINTS)
        ]
    )
    routes: dict[str, list[Endpoint]] = {}
    route_rows = []
    for i, (model, price_in, price_out, _share) in enumerate(MODELS):
        chosen = [endpoints[i % len(endpoints)], endpoints[(i + 2) % len(endpoints)]]
        routes[model] = chosen
        for priority, endpoint in enumerate(chosen):
            route_rows.append(
                ModelRoute(
                    model_name=model,
                    endpoint=endpoint,
                    upstream_model=f"{model}-upstream",
                    priority=priority,
                    context_window=128_000,
                    max_output_tokens=4096,
                    input_price_per_1k=price_in,
                    output_price_per_1k=price_out,
                )
            )
    ModelRoute.objects.bulk_create(route_rows)
    # Monthly budgets for a fifth of the users, with this month's counter.
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    budgets = Budget.objects.bulk_create(
        [
            Budget(scope="user", user=p, period="monthly", token_limit=50_000_000)
            for p in people[::5]
        ]
    )
    BudgetCounter.objects.bulk_create(
        [
            BudgetCounter(
                budget=b,
                period_start=month,
                used_tokens=rng.randrange(1_000_000, 49_000_000),
            )
            for b in budgets
        ]
    )
    # A combo: who calls which model through which key (NULL: the chat), with
    # the primary and the fallback endpoint of that model.
    weights = [m[3] for m in MODELS]
    combos = []
    for person in people:
        models = set(rng.choices(range(len(MODELS)), weights, k=rng.randint(1, 3)))
        callers = [None, *keys_of.get(person.pk, [])]
        for m in sorted(models):
            for key_id in callers:
                model, price_in, price_out, _share = MODELS[m]
                primary, fallback = routes[model]
                combos.append(
                    (
                        person.pk,
                        key_id,
                        model,
                        primary.pk,
                        primary.name,
                        fallback.pk,
                        fallback.name,
                        price_in,
                        price_out,
                    )
                )
    rng.shuffle(combos)
    return combos


RECORDS_SQL = """
INSERT INTO gateway_usagerecord (
    request_id, created_at, source, user_id, api_key_id, conversation_id,
    model_name, endpoint_id, endpoint_name, upstream_model, prompt_tokens,
    completion_tokens, tokens_estimated, latency_ms, ttft_ms, status, error_type,
    error_message, attempts, fallback_hops, cost)
SELECT
    gen_random_uuid(),
    r.created_at,
    CASE WHEN c.api_key_id IS NULL THEN 'chat' ELSE 'api' END,
    c.user_id, c.api_key_id,
    CASE WHEN c.api_key_id IS NULL THEN gen_random_uuid() END,
    c.model_name,
    CASE WHEN r.status = 'rejected' THEN NULL
         WHEN r.hop THEN c.fallback_id ELSE c.primary_id END,
    CASE WHEN r.status = 'rejected' THEN ''
         WHEN r.hop THEN c.fallback_name ELSE c.primary_name END,
    CASE WHEN r.status = 'rejected' THEN '' ELSE c.model_name || '-upstream' END,
    r.prompt, r.completion, r.estimated, r.latency,
    CASE WHEN r.status IN ('ok', 'cancelled') AND r.streamed
         THEN round((r.latency * (0.05 + 0.25 * r.u5))::numeric, 3)::float8 END,
    r.status,
    CASE r.status WHEN 'error' THEN 'upstream_error'
                  WHEN 'rejected' THEN 'rate_limited' ELSE '' END,
    CASE r.status WHEN 'error' THEN 'The endpoint answered HTTP 503.'
                  WHEN 'rejected' THEN 'Too many requests this minute.' ELSE '' END,
    CASE WHEN r.status = 'rejected' THEN 0 WHEN r.hop THEN 2 ELSE 1 END,
    CASE WHEN r.hop AND r.status <> 'rejected'
    THEN jsonb_build_array(jsonb_build_object(
        'endpoint', c.primary_name, 'endpoint_id', c.primary_id,
        'reason', 'transient', 'to_endpoint', c.fallback_name,
        'error_type', 'timeout', 'status_code', NULL,
        'message', 'The endpoint did not answer in time.', 'attempts', 1,
        'mid_stream', false))
    ELSE '[]'::jsonb END,
    CASE WHEN r.status IN ('ok', 'cancelled') THEN round(
        (r.prompt * c.price_in + r.completion * c.price_out) / 1000, 6)
         WHEN r.status = 'cached' THEN 0 END
FROM (
    SELECT
        g.i,
        -- In time order, as a live gateway inserts them, so the heap is
        -- physically ordered by created_at (index range scans stay cheap).
        %(now)s - make_interval(
            secs => %(seconds)s * (1 - (g.i - random()) / %(total)s)) AS created_at,
        -- Heavy and light callers: a skewed pick among the combos.
        1 + floor(power(random(), 2.2) * %(combos)s)::int AS combo,
        s.status, s.hop, s.estimated, s.streamed, s.u5,
        CASE WHEN s.status = 'rejected' THEN 0
             ELSE 20 + floor(power(random(), 3) * 6000)::int END AS prompt,
        CASE WHEN s.status IN ('ok', 'cached')
             THEN 5 + floor(power(random(), 2) * 1500)::int
             WHEN s.status = 'cancelled' THEN floor(random() * 200)::int
             ELSE 0 END AS completion,
        round((CASE s.status
            WHEN 'rejected' THEN 0.3 + random() * 2
            WHEN 'cached' THEN 2 + random() * 10
            WHEN 'error' THEN 50 + random() * 30000
            ELSE 150 + power(random(), 2) * 12000 END)::numeric, 3)::float8 AS latency
    FROM generate_series(%(start)s, %(stop)s) AS g(i)
    CROSS JOIN LATERAL (
        SELECT
            CASE WHEN u < 0.90 THEN 'ok' WHEN u < 0.94 THEN 'error'
                 WHEN u < 0.96 THEN 'cancelled' WHEN u < 0.98 THEN 'rejected'
                 ELSE 'cached' END AS status,
            u2 < 0.03 AS hop, u3 < 0.05 AS estimated, u4 < 0.7 AS streamed, u5
        FROM (SELECT random() + g.i * 0 AS u, random() AS u2, random() AS u3,
                     random() AS u4, random() AS u5) AS x
    ) AS s
) AS r
JOIN bench_combo AS c ON c.id = r.combo
"""

AGGREGATE_SQL = """
CREATE TEMP TABLE bench_agg AS
SELECT
    date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket,
    user_id, api_key_id, model_name, endpoint_id, endpoint_name,
    count(*) AS requests,
    count(*) FILTER (WHERE status = 'error') AS errors,
    count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
    count(*) FILTER (WHERE status = 'rejected') AS rejected,
    count(*) FILTER (WHERE status = 'cached') AS cached,
    count(*) FILTER (WHERE tokens_estimated) AS estimated,
    COALESCE(sum(prompt_tokens), 0) AS prompt_tokens,
    COALESCE(sum(completion_tokens), 0) AS completion_tokens,
    -- Exactly rollups._Micros: costs rounded, latencies truncated.
    COALESCE(sum(CAST(ROUND((cost) * 1000000) AS BIGINT)), 0) AS cost_micros,
    COALESCE(sum(CAST(TRUNC((latency_ms) * 1000) AS BIGINT)), 0) AS latency_us_sum,
    count(latency_ms) AS latency_count,
    COALESCE(sum(CAST(TRUNC((ttft_ms) * 1000) AS BIGINT)), 0) AS ttft_us_sum,
    count(ttft_ms) AS ttft_count
FROM gateway_usagerecord
GROUP BY 1, 2, 3, 4, 5, 6
"""

COUNTERS = (
    "requests, errors, cancelled, rejected, cached, estimated, prompt_tokens, "
    "completion_tokens, cost_micros, latency_us_sum, latency_count, ttft_us_sum, "
    "ttft_count"
)

ROLLUP_SQL = f"""
INSERT INTO gateway_usagerollup (
    bucket, dimensions, user_id, api_key_id, model_name, endpoint_id,
    endpoint_name, {COUNTERS})
SELECT a.bucket, d.hash, a.user_id, a.api_key_id, a.model_name, a.endpoint_id,
       a.endpoint_name, {", ".join("a." + c.strip() for c in COUNTERS.split(","))}
FROM bench_agg AS a
JOIN bench_dims AS d
  ON d.user_id = COALESCE(a.user_id, 0) AND d.api_key_id = COALESCE(a.api_key_id, 0)
 AND d.model_name = a.model_name AND d.endpoint_id = COALESCE(a.endpoint_id, 0)
 AND d.endpoint_name = a.endpoint_name
ORDER BY a.bucket, d.hash
"""

PROBES_SQL = """
INSERT INTO monitoring_proberesult
    (endpoint_id, checked_at, status, latency_ms, http_status, error)
SELECT e.id, t.at, p.status,
       CASE WHEN p.status = 'disconnected' THEN NULL ELSE p.latency END,
       CASE WHEN p.status = 'disconnected' THEN 503 ELSE 200 END,
       CASE WHEN p.status = 'disconnected' THEN 'HTTP 503' ELSE '' END
FROM gateway_endpoint AS e
CROSS JOIN generate_series(%(now)s - make_interval(secs => %(seconds)s), %(now)s,
                           make_interval(secs => e.probe_interval)) AS t(at)
CROSS JOIN LATERAL (
    SELECT CASE WHEN u < 0.95 THEN 'connected' WHEN u < 0.98 THEN 'slow'
                ELSE 'disconnected' END AS status,
           CASE WHEN u < 0.95 THEN 40 + random() * 400
                ELSE 500 + random() * 1500 END AS latency
    FROM (SELECT random() + 0 * extract(epoch FROM t.at) AS u) AS x
) AS p
"""

PROBE_ROLLUP_SQL = """
INSERT INTO monitoring_proberollup
    (endpoint_id, hour, probes, up, slow, latency_sum_ms, latency_count)
SELECT endpoint_id,
       date_trunc('hour', checked_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       count(*), count(*) FILTER (WHERE status IN ('connected', 'slow')),
       count(*) FILTER (WHERE status = 'slow'),
       COALESCE(sum(latency_ms) FILTER (WHERE status IN ('connected', 'slow')), 0),
       count(latency_ms) FILTER (WHERE status IN ('connected', 'slow'))
FROM monitoring_proberesult
GROUP BY 1, 2
"""


TABLES = (
    "auth_user, gateway_usagerollup, gateway_usagerecord, gateway_budgetcounter, "
    "gateway_budget, gateway_modelroute, gateway_endpoint, gateway_apikey, "
    "monitoring_proberesult, monitoring_proberollup"
)


def secondary_indexes(cursor, table: str) -> list[tuple[str, str, str | None]]:
    """(name, CREATE statement, constraint name or None) of every non-pk index."""
    cursor.execute(
        """
        SELECT i.indexname, i.indexdef, c.conname
        FROM pg_indexes AS i
        LEFT JOIN pg_constraint AS c
          ON c.conname = i.indexname AND c.conrelid = %s::regclass
        WHERE i.tablename = %s AND i.indexname NOT LIKE '%%_pkey'
        """,
        [table, table],
    )
    return cursor.fetchall()


def generate(records: int, users: int, days: float, chunk: int, seed: int) -> None:
    from django.db import connection, transaction
    from django.utils import timezone

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    with transaction.atomic():
        combos = make_world(users, seed)
    now = timezone.now()
    print(f"world: {users} users, {len(combos)} caller/model combos", flush=True)

    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SET maintenance_work_mem = '512MB'")
        cursor.execute("SET work_mem = '256MB'")
        cursor.execute("SELECT setseed(%s)", [(seed % 1000) / 1000])
        cursor.execute(
            """
            CREATE TEMP TABLE bench_combo (
                id int PRIMARY KEY, user_id bigint, api_key_id bigint,
                model_name text, primary_id bigint, primary_name text,
                fallback_id bigint, fallback_name text,
                price_in numeric, price_out numeric)
            """
        )
        with cursor.connection.cursor().copy("COPY bench_combo FROM STDIN") as copy:
            for i, combo in enumerate(combos, start=1):
                copy.write_row((i, *combo))

        # Load without secondary indexes or foreign-key triggers; rebuild after.
        indexes = secondary_indexes(cursor, "gateway_usagerecord")
        for name, _sql, constraint in indexes:
            if constraint:
                cursor.execute(
                    f"ALTER TABLE gateway_usagerecord DROP CONSTRAINT {constraint}"
                )
            else:
                cursor.execute(f"DROP INDEX {name}")
        cursor.execute("SET session_replication_role = replica")
        t0 = time.perf_counter()
        for start in range(1, records + 1, chunk):
            stop = min(records, start + chunk - 1)
            cursor.execute(
                RECORDS_SQL,
                {
                    "now": now,
                    "seconds": days * 86400,
                    "combos": len(combos),
                    "total": records,
                    "start": start,
                    "stop": stop,
                },
            )
            rate = stop / (time.perf_counter() - t0)
            print(f"  records {stop:>11,}  ({rate:,.0f}/s)", flush=True)
        cursor.execute("SET session_replication_role = DEFAULT")
        load = time.perf_counter() - t0

        t0 = time.perf_counter()
        for name, sql, constraint in indexes:
            cursor.execute(sql)
            if constraint:
                cursor.execute(
                    f"ALTER TABLE gateway_usagerecord ADD CONSTRAINT {constraint} "
                    f"UNIQUE USING INDEX {name}"
                )
        index_time = time.perf_counter() - t0
        print(f"  {len(indexes)} indexes rebuilt in {index_time:.1f} s", flush=True)

        t0 = time.perf_counter()
        cursor.execute(AGGREGATE_SQL)
        cursor.execute(
            "SELECT DISTINCT user_id, api_key_id, model_name, endpoint_id, "
            "endpoint_name FROM bench_agg"
        )
        dims = cursor.fetchall()
        cursor.execute(
            "CREATE TEMP TABLE bench_dims (hash text, user_id bigint, "
            "api_key_id bigint, model_name text, endpoint_id bigint, "
            "endpoint_name text)"
        )
        with cursor.connection.cursor().copy("COPY bench_dims FROM STDIN") as copy:
            for u, k, m, e, en in dims:
                copy.write_row(
                    (dims_hash(u, k, m, e, en), u or 0, k or 0, m, e or 0, en)
                )
        cursor.execute("ANALYZE bench_agg")
        cursor.execute("ANALYZE bench_dims")
        cursor.execute(ROLLUP_SQL)
        rollups = cursor.rowcount
        rollup_time = time.perf_counter() - t0
        cursor.execute("DROP TABLE bench_agg, bench_dims, bench_combo")
        # The status dashboard's data: every endpoint probed at its interval.
        cursor.execute(PROBES_SQL, {"now": now, "seconds": days * 86400})
        probes = cursor.rowcount
        cursor.execute(PROBE_ROLLUP_SQL)
        print(f"  {probes:,} probe results and their hourly rollups", flush=True)
        t0 = time.perf_counter()
        cursor.execute("VACUUM ANALYZE gateway_usagerecord")
        cursor.execute("VACUUM ANALYZE gateway_usagerollup")
        cursor.execute("ANALYZE monitoring_proberesult")
        cursor.execute("ANALYZE monitoring_proberollup")
        vacuum = time.perf_counter() - t0
        cursor.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('gateway_usagerecord')), "
            "pg_size_pretty(pg_total_relation_size('gateway_usagerollup'))"
        )
        record_size, rollup_size = cursor.fetchone()
    total = time.perf_counter() - started
    print(
        f"{records:,} records in {load:.1f} s ({records / load:,.0f}/s), "
        f"indexes {index_time:.1f} s, {rollups:,} rollup rows in {rollup_time:.1f} s, "
        f"vacuum analyze {vacuum:.1f} s; total {total:.1f} s. "
        f"Sizes: records {record_size}, rollups {rollup_size}.",
        flush=True,
    )


def verify() -> None:
    """Rebuild the rollups with the project's own code and compare row by row."""
    from django.db import connection

    from gateway.accounting.rollups import rebuild_rollups

    query = (
        f"SELECT bucket, dimensions, user_id, api_key_id, model_name, endpoint_id, "
        f"endpoint_name, {COUNTERS} FROM gateway_usagerollup ORDER BY 1, 2"
    )
    with connection.cursor() as cursor:
        cursor.execute(query)
        ours = cursor.fetchall()
        cursor.execute(
            "SELECT min(created_at), max(created_at) FROM gateway_usagerecord"
        )
        since, until = cursor.fetchone()
    t0 = time.perf_counter()
    rebuilt = rebuild_rollups(since, until)
    elapsed = time.perf_counter() - t0
    with connection.cursor() as cursor:
        cursor.execute(query)
        theirs = cursor.fetchall()
    print(
        f"rebuild_rollups: {rebuilt.created:,} rows in {elapsed:.1f} s "
        f"(replaced {rebuilt.deleted:,})"
    )
    if ours != theirs:
        differing = sum(1 for a, b in zip(ours, theirs, strict=False) if a != b)
        sys.exit(
            f"MISMATCH: {len(ours)} generated rows, {len(theirs)} rebuilt, "
            f"{differing} differ"
        )
    print(f"verified: the {len(ours):,} generated rollup rows equal the rebuilt ones")

    from gateway.models import Endpoint
    from monitoring.probes import refresh_rollups

    probe_query = (
        "SELECT endpoint_id, hour, probes, up, slow, "
        "round(latency_sum_ms::numeric, 6), "
        "latency_count FROM monitoring_proberollup ORDER BY 1, 2"
    )
    with connection.cursor() as cursor:
        cursor.execute(probe_query)
        ours = cursor.fetchall()
        cursor.execute("SELECT min(checked_at) FROM monitoring_proberesult")
        (oldest,) = cursor.fetchone()
    refresh_rollups(list(Endpoint.objects.values_list("pk", flat=True)), oldest)
    with connection.cursor() as cursor:
        cursor.execute(probe_query)
        theirs = cursor.fetchall()
    if ours != theirs:
        sys.exit(f"MISMATCH in probe rollups: {len(ours)} rows, {len(theirs)} rebuilt")
    print(f"verified: the {len(ours):,} probe rollup rows equal refresh_rollups'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--database-url", required=True, help="postgres://…/<name containing bench>"
    )
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--days", type=float, default=32.0)
    parser.add_argument("--chunk", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare with rebuild_rollups afterwards (use a small --records)",
    )
    args = parser.parse_args()
    if args.records < 1 or args.users < 1 or args.days <= 0 or args.chunk < 1:
        parser.error("--records, --users, --days and --chunk must be positive")
    setup_django(bench_database_url(args.database_url))
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    generate(args.records, args.users, args.days, args.chunk, args.seed)
    if args.verify:
        verify()


if __name__ == "__main__":
    main()
