"""Usage pages and exports at 10M records: latency, query plans, export memory.

Runs against a database filled by `bench/generate_usage.py` (DATABASE_URL, whose
name must contain "bench"). A real web server (uvicorn, one process, in a
subprocess on a free port) serves every request:

- the staff pages (the admin's usage and status dashboards for 30 days, the
  admin's usage records list), the usage page (`/usage/`, as the user with
  the most traffic, and as staff looking at that user) and
  `/api/usage/rollups/` for 30 days: the first request, then `--runs`
  requests after `--warmup` more: median and p95 wall time as the client
  sees it;
- the same pages in-process: how many queries, their total SQL time, and
  EXPLAIN (ANALYZE, BUFFERS) of the slowest ones (`--plans FILE`); the
  dashboard's query functions alone; two sketches of a cheaper dashboard;
- a CSV export of the newest `--export-rows` records through
  `/api/usage/records/?format=csv&since=...&until=...` on a freshly started
  server: rows/s, and the web process's peak memory (VmRSS sampled every
  20 ms, and VmHWM); beside it PostgreSQL's own COPY of the same rows (the
  floor) and a sketch of a cheaper exporter.

Pages that do not exist yet (their URL does not resolve) are reported as such.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/llmsite_bench \\
    REDIS_URL=redis://127.0.0.1:6379/13 \\
        .venv/bin/python bench/usage_queries.py [--runs 20 --plans /tmp/plans.txt]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_model, percentile  # noqa: E402


def check_database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql", "pgsql"}:
        sys.exit("refusing: DATABASE_URL must name a PostgreSQL benchmark database")
    if "bench" not in parts.path:
        sys.exit("refusing: the database name must contain 'bench'")
    return url


os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Server:
    """One uvicorn process serving the project on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [
            str(BIN / "uvicorn"),
            "llmsite.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self.child = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ))

    def wait_ready(self) -> None:
        import httpx

        for _ in range(300):
            if self.child.poll() is not None:
                sys.exit(f"uvicorn exited with {self.child.returncode}")
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        sys.exit("uvicorn did not answer in 30 s")

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Who:
    """A caller: a session cookie (pages) or an API key (the API)."""

    label: str
    cookies: dict[str, str]
    headers: dict[str, str]
    user_id: int


def callers() -> tuple[Who, Who]:
    """The staff user, and the regular user with the most records in 30 days."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db.models import Sum
    from django.test import Client
    from django.utils import timezone

    from gateway.models import ApiKey, UsageRollup

    if "testserver" not in settings.ALLOWED_HOSTS:
        settings.ALLOWED_HOSTS.append("testserver")
    user_model = get_user_model()
    staff, _ = user_model.objects.get_or_create(
        username="bench-staff", defaults={"is_staff": True, "is_superuser": True}
    )
    top = (
        UsageRollup.objects.filter(
            bucket__gte=timezone.now() - timedelta(days=30), user__isnull=False
        )
        .values("user_id")
        .annotate(n=Sum("requests"))
        .order_by("-n")
        .first()
    )
    if top is None:
        sys.exit("no usage in the last 30 days: run bench/generate_usage.py first")
    heaviest = user_model.objects.get(pk=top["user_id"])
    result = []
    for user, label in ((staff, "staff"), (heaviest, "user with most traffic")):
        client = Client()
        client.force_login(user)
        _key, raw = ApiKey.generate(user, "bench usage_queries")
        result.append(
            Who(
                label,
                {
                    settings.SESSION_COOKIE_NAME: client.cookies[
                        settings.SESSION_COOKIE_NAME
                    ].value
                },
                {"Authorization": f"Bearer {raw}"},
                user.pk,
            )
        )
    return result[0], result[1]


@dataclass
class Target:
    label: str
    path: str | None  # None: the page does not exist in this version
    who: Who
    api: bool  # authenticate with the API key rather than the session


def targets(staff: Who, user: Who) -> list[Target]:
    from django.urls import NoReverseMatch, Resolver404, resolve, reverse
    from django.utils import timezone

    def exists(path: str) -> str | None:
        try:
            match = resolve(path.split("?")[0])
        except Resolver404:
            return None
        # A catch-all (the API's JSON 404) has no name.
        return path if match.url_name else None

    def named(name: str, query: str = "") -> str | None:
        try:
            return reverse(name) + query
        except NoReverseMatch:
            return None

    now = timezone.now()
    window = urlencode(
        {
            "since": (now - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "until": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    rollups = exists("/api/usage/rollups/")
    return [
        Target(
            "admin usage dashboard, 30 d",
            named("admin:monitoring_endpointhealth_usage", "?range=30d"),
            staff,
            False,
        ),
        Target(
            "admin status dashboard, 30 d",
            named("admin:monitoring_endpointhealth_changelist", "?range=30d"),
            staff,
            False,
        ),
        Target("usage page /usage/", exists("/usage/"), user, False),
        Target(
            "usage page of that user, as staff",
            exists("/usage/") and f"/usage/?user={user.user_id}",
            staff,
            False,
        ),
        Target(
            "admin usage records list (first page)",
            named("admin:gateway_usagerecord_changelist"),
            staff,
            False,
        ),
        Target(
            "/api/usage/rollups/ 30 d hourly, user",
            rollups and f"{rollups}?{window}",
            user,
            True,
        ),
        Target(
            "/api/usage/rollups/ 30 d daily, user",
            rollups and f"{rollups}?{window}&bucket=day",
            user,
            True,
        ),
        Target(
            "/api/usage/rollups/ 30 d daily by model, staff",
            rollups and f"{rollups}?{window}&bucket=day&group_by=model",
            staff,
            True,
        ),
        Target(
            "/api/usage/rollups/ 30 d daily, staff",
            rollups and f"{rollups}?{window}&bucket=day",
            staff,
            True,
        ),
        Target(
            "/api/usage/rollups/ 30 d hourly, staff",
            rollups and f"{rollups}?{window}",
            staff,
            True,
        ),
    ]


def timed_requests(
    base: str, target: Target, warmup: int, runs: int
) -> tuple[float, list[float]]:
    """The first request's time (cold caches), and the timed repeats."""
    import httpx

    headers = target.who.headers if target.api else {}
    cookies = {} if target.api else target.who.cookies
    with httpx.Client(
        base_url=base, headers=headers, cookies=cookies, timeout=120
    ) as c:
        times = []
        first = 0.0
        for i in range(1 + warmup + runs):
            t0 = time.perf_counter()
            response = c.get(target.path)
            elapsed = time.perf_counter() - t0
            if response.status_code != 200:
                raise RuntimeError(
                    f"{target.label}: HTTP {response.status_code} {response.text[:200]}"
                )
            if i == 0:
                first = elapsed * 1000
            elif i > warmup:
                times.append(elapsed * 1000)
    return first, times


def captured(target: Target) -> list[dict[str, str]]:
    """The SQL one request runs, in-process, with each statement's time."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings

    if target.api:
        client = Client(headers=target.who.headers)
    else:
        client = Client()
        for name, value in target.who.cookies.items():
            client.cookies[name] = value
    # The rollups API keeps closed hours' sums in the cache for a minute:
    # off here, so the queries are the cold path's (the first request's).
    with override_settings(API_ROLLUP_CACHE_SECONDS=0):
        client.get(target.path)  # warm PostgreSQL's buffers and the code
        with CaptureQueriesContext(connection) as queries:
            response = client.get(target.path)
            if response.streaming:
                b"".join(response.streaming_content)
    return list(queries.captured_queries)


def explain(sql: str) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
        return "\n".join(row[0] for row in cursor.fetchall())


def export_window(rows: int) -> tuple[str, str, int]:
    """since/until covering the newest `rows` records, and the exact count."""
    from django.db import connection
    from django.utils import timezone

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT created_at FROM gateway_usagerecord "
            "ORDER BY created_at DESC OFFSET %s LIMIT 1",
            [rows - 1],
        )
        (since,) = cursor.fetchone()
        until = timezone.now() + timedelta(minutes=1)
        cursor.execute(
            "SELECT count(*) FROM gateway_usagerecord "
            "WHERE created_at >= %s AND created_at < %s",
            [since, until],
        )
        (count,) = cursor.fetchone()
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    return since.strftime(fmt), until.strftime(fmt), count


def measure_export(staff: Who, rows: int) -> dict[str, float] | None:
    import httpx
    from django.urls import Resolver404, resolve

    try:
        if not resolve("/api/usage/records/").url_name:
            return None
    except Resolver404:
        return None
    since, until, expected = export_window(rows)
    path = "/api/usage/records/?" + urlencode(
        {"format": "csv", "since": since, "until": until}
    )
    with Server() as server:
        pid = server.child.pid
        # One small request first, so the baseline includes a loaded app.
        httpx.get(
            server.base + "/api/usage/records/?page_size=1",
            headers=staff.headers,
            timeout=30,
        ).raise_for_status()
        base_rss = proc_kib(pid, "VmRSS")
        peak = [base_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], proc_kib(pid, "VmRSS"))
                except OSError:
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        lines = 0
        first_byte = None
        t0 = time.perf_counter()
        with httpx.stream(
            "GET", server.base + path, headers=staff.headers, timeout=600
        ) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(
                    f"export: HTTP {response.status_code} {response.text[:300]}"
                )
            for chunk in response.iter_bytes():
                if first_byte is None:
                    first_byte = time.perf_counter() - t0
                lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        hwm = proc_kib(pid, "VmHWM")
    exported = lines - 1  # the header row
    if exported != expected:
        print(f"WARNING: exported {exported:,} rows, the window holds {expected:,}")
    return {
        "rows": exported,
        "seconds": elapsed,
        "first_byte_ms": (first_byte or 0) * 1000,
        "rows_per_s": exported / elapsed,
        "base_mib": base_rss / 1024,
        "peak_mib": peak[0] / 1024,
        "hwm_mib": hwm / 1024,
    }


COPY_SQL = """
COPY (
    SELECT r.request_id, r.created_at, u.username, k.name, r.source, r.model_name,
           r.endpoint_name, r.upstream_model, jsonb_array_length(r.fallback_hops),
           r.status, r.prompt_tokens, r.completion_tokens,
           r.prompt_tokens + r.completion_tokens, r.tokens_estimated, r.latency_ms,
           r.ttft_ms, r.cost, r.error_type, r.attempts, r.conversation_id
    FROM gateway_usagerecord AS r
    LEFT JOIN auth_user AS u ON u.id = r.user_id
    LEFT JOIN gateway_apikey AS k ON k.id = r.api_key_id
    WHERE r.created_at >= %s AND r.created_at < %s
    ORDER BY r.created_at, r.id
) TO STDOUT WITH (FORMAT csv, HEADER)
"""


def copy_floor(rows: int) -> dict[str, float]:
    """The same window as CSV written by PostgreSQL itself (COPY): the floor."""
    from django.db import connection

    since, until, _expected = export_window(rows)
    connection.ensure_connection()
    lines = 0
    t0 = time.perf_counter()
    cursor = connection.connection.cursor()
    with cursor, cursor.copy(COPY_SQL, [since, until]) as copy:
        for chunk in copy:
            lines += bytes(chunk).count(b"\n")
    elapsed = time.perf_counter() - t0
    return {"rows": lines - 1, "seconds": elapsed, "rows_per_s": (lines - 1) / elapsed}


TEXT_SQL = """
SELECT r.request_id::text,
       to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       u.username, k.name, r.source, r.model_name, r.endpoint_name, r.upstream_model,
       jsonb_array_length(r.fallback_hops)::text, r.status, r.prompt_tokens::text,
       r.completion_tokens::text, (r.prompt_tokens + r.completion_tokens)::text,
       r.tokens_estimated::text, r.latency_ms::text, r.ttft_ms::text, r.cost::text,
       r.error_type, r.attempts::text, r.conversation_id::text
FROM gateway_usagerecord AS r
LEFT JOIN auth_user AS u ON u.id = r.user_id
LEFT JOIN gateway_apikey AS k ON k.id = r.api_key_id
WHERE r.created_at >= %s AND r.created_at < %s
ORDER BY r.created_at, r.id
"""
# Columns of TEXT_SQL a caller or an upstream can write: guarded as formulas.
_FREE_TEXT = (2, 3, 5, 6, 7, 9, 17)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def text_sketch(rows: int) -> dict[str, float]:
    """A sketch of a cheaper exporter: columns as text, one transaction.

    Not the project's code: PostgreSQL formats every value, so Python only
    guards the free-text cells and joins CSV; the named cursor is declared
    inside a transaction, so no WITH HOLD copy of the result is made.
    """
    import csv
    import io

    from django.db import connection

    since, until, _expected = export_window(rows)
    connection.ensure_connection()
    conn = connection.connection
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    count, first = 0, None
    t0 = time.perf_counter()
    with conn.transaction(), conn.cursor(name="bench_export") as cursor:
        cursor.execute(TEXT_SQL, [since, until])
        while batch := cursor.fetchmany(2000):
            out = []
            for row in batch:
                row = list(row)
                for i in _FREE_TEXT:
                    if row[i] and row[i].startswith(_FORMULA):
                        row[i] = "'" + row[i]
                out.append(row)
            writer.writerows(out)
            buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            count += len(batch)
            if first is None:
                first = time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    return {
        "rows": count,
        "seconds": elapsed,
        "rows_per_s": count / elapsed,
        "first_ms": (first or 0) * 1000,
    }


def dashboard_functions(runs: int) -> list[tuple[str, float, float]]:
    """The dashboard's query functions alone, 30 days: no HTTP, no template."""
    from django.utils import timezone

    from monitoring import dashboard

    now = timezone.now()
    span = dashboard.parse_range({"range": "30d"}, now)
    calls = {
        "requests_per_hour (by day)": lambda: dashboard.requests_per_hour(span),
        **{
            f"tokens_per_day by {by}": (
                lambda by=by: dashboard.tokens_per_day(span, by)
            )
            for by in dashboard.TOKEN_DIMENSIONS
        },
        "usage_totals": lambda: dashboard.usage_totals(span),
        "budget_use": lambda: dashboard.budget_use(now),
    }
    rows = []
    for name, call in calls.items():
        call()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
        rows.append((name, statistics.median(times), percentile(times, 95)))
    return rows


ONE_PASS_SQL = """
SELECT date_trunc('day', bucket AT TIME ZONE 'UTC') AS day,
       model_name, endpoint_name, user_id,
       GROUPING(model_name, endpoint_name, user_id) AS level,
       sum(requests), sum(errors), sum(prompt_tokens), sum(completion_tokens)
FROM {table}
WHERE bucket >= %s AND bucket < %s
GROUP BY GROUPING SETS ((1), (1, model_name), (1, endpoint_name), (1, user_id))
"""


def dashboard_sketches(runs: int) -> list[tuple[str, int, float, float]]:
    """What the 30-day usage dashboard could cost: one pass, or daily rows.

    Not the project's code: the series the dashboard draws (requests and
    errors per day, tokens per day by model, endpoint and user, totals) in
    one GROUPING SETS query, over the hourly rollups and over a daily table
    built here as a temporary table.
    """
    from django.db import connection
    from django.utils import timezone

    now = timezone.now()
    since = now - timedelta(days=30)
    results = []
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_daily")
        cursor.execute(
            "CREATE TEMP TABLE bench_daily AS "
            "SELECT date_trunc('day', bucket AT TIME ZONE 'UTC') "
            "AT TIME ZONE 'UTC' AS bucket, "
            "user_id, api_key_id, model_name, endpoint_id, endpoint_name, "
            "sum(requests) AS requests, sum(errors) AS errors, "
            "sum(prompt_tokens) AS prompt_tokens, "
            "sum(completion_tokens) AS completion_tokens "
            "FROM gateway_usagerollup GROUP BY 1, 2, 3, 4, 5, 6"
        )
        cursor.execute("CREATE INDEX ON bench_daily (bucket)")
        cursor.execute("ANALYZE bench_daily")
        for label, table in (
            ("hourly rollups, one GROUPING SETS query", "gateway_usagerollup"),
            ("daily table, one GROUPING SETS query", "bench_daily"),
        ):
            cursor.execute(
                f"SELECT count(*) FROM {table} WHERE bucket >= %s AND bucket < %s",
                [since, now],
            )
            (count,) = cursor.fetchone()
            sql = ONE_PASS_SQL.format(table=table)
            cursor.execute(sql, [since, now])
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                cursor.execute(sql, [since, now])
                cursor.fetchall()
                times.append((time.perf_counter() - t0) * 1000)
            results.append(
                (label, count, statistics.median(times), percentile(times, 95))
            )
        cursor.execute("DROP TABLE bench_daily")
    return results


def machine() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        (pg,) = cursor.fetchone()
        cursor.execute(
            "SELECT (SELECT count(*) FROM gateway_usagerecord), "
            "(SELECT count(*) FROM gateway_usagerollup), "
            "(SELECT count(*) FROM gateway_usagerollup "
            " WHERE bucket >= now() - interval '30 days')"
        )
        records, rollups, recent = cursor.fetchone()
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), {mem:.0f} GiB, PostgreSQL {pg}; "
        f"{records:,} usage records, {rollups:,} rollup rows "
        f"({recent:,} in the last 30 days)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--export-rows", type=int, default=1_000_000)
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--plans", help="write EXPLAIN ANALYZE of slow queries here")
    parser.add_argument(
        "--only", help="measure only targets whose label contains this text"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.export_rows < 1:
        parser.error("--runs and --export-rows must be positive")
    check_database_url()
    import django

    django.setup()

    print(machine())
    print(f"load average at start: {loadavg()}")
    staff, user = callers()
    chosen = [t for t in targets(staff, user) if not args.only or args.only in t.label]
    plans: list[str] = []
    rows = []
    with Server() as server:
        for target in chosen:
            if target.path is None:
                rows.append(f"| {target.label} | not in this version | | | | |")
                continue
            first, times = timed_requests(server.base, target, args.warmup, args.runs)
            queries = captured(target)
            sql_ms = sum(float(q["time"]) * 1000 for q in queries)
            rows.append(
                f"| {target.label} | {first:.0f} ms "
                f"| {statistics.median(times):.1f} ms "
                f"| {percentile(times, 95):.1f} ms | {len(queries)} "
                f"| {sql_ms:.1f} ms |"
            )
            print(rows[-1], flush=True)
            slowest = sorted(queries, key=lambda q: -float(q["time"]))[:3]
            for q in slowest:
                plans.append(
                    f"## {target.label}: {float(q['time']) * 1000:.1f} ms\n"
                    f"{q['sql']}\n\n{explain(q['sql'])}\n"
                )
    print(f"load average after the pages: {loadavg()}")
    print()
    print(
        f"GET over HTTP, one uvicorn process: the first request, then "
        f"{args.runs} runs after {args.warmup} more:"
    )
    print(
        "| page | first request | median | p95 | queries "
        "| SQL time, cold path (in-process) |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))

    if not args.only:
        print()
        print("dashboard query functions in-process, 30 days:")
        print("| function | median | p95 |")
        print("|---|---|---|")
        for name, median, p95 in dashboard_functions(args.runs):
            print(f"| {name} | {median:.1f} ms | {p95:.1f} ms |")

        print()
        print("sketches of a faster usage dashboard, 30 days (not project code):")
        print("| query | rows read | median | p95 |")
        print("|---|---|---|---|")
        for label, count, median, p95 in dashboard_sketches(args.runs):
            print(f"| {label} | {count:,} | {median:.1f} ms | {p95:.1f} ms |")

    if not args.no_export:
        print()
        print(f"load average before the export: {loadavg()}")
        result = measure_export(staff, args.export_rows)
        if result is None:
            print("CSV export: /api/usage/records/ is not in this version")
        else:
            print(
                f"CSV export of {result['rows']:,} rows: {result['seconds']:.1f} s, "
                f"{result['rows_per_s']:,.0f} rows/s, first byte "
                f"{result['first_byte_ms']:.0f} ms; web process RSS "
                f"{result['base_mib']:.0f} MiB before, peak sampled "
                f"{result['peak_mib']:.0f} MiB, VmHWM {result['hwm_mib']:.0f} MiB"
            )
        floor = copy_floor(args.export_rows)
        print(
            f"floor, the same rows as CSV by PostgreSQL's COPY in-process: "
            f"{floor['rows']:,} rows in {floor['seconds']:.1f} s, "
            f"{floor['rows_per_s']:,.0f} rows/s"
        )
        sketch = text_sketch(args.export_rows)
        print(
            f"sketch, columns as text from SQL + csv.writer in-process: "
            f"{sketch['rows']:,} rows in {sketch['seconds']:.1f} s, "
            f"{sketch['rows_per_s']:,.0f} rows/s, first chunk "
            f"{sketch['first_ms']:.0f} ms"
        )
        print(f"load average after the export: {loadavg()}")

    if args.plans:
        Path(args.plans).write_text("\n".join(plans))
        print(f"query plans written to {args.plans}")


if __name__ == "__main__":
    main()
