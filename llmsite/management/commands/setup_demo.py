"""First-run setup for `make run`: an admin user and the demo endpoints."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from gateway import transport_policy
from gateway.models import Endpoint, ModelRoute, RouteKind
from scripts import peers

DEMO_MODEL = "demo-chat"
DEMO_UPSTREAM_MODEL = "sim-small"
# Embeddings, with the same primary/fallback pair (the simulator embeds too).
DEMO_EMBED_MODEL = "demo-embed"
DEMO_UPSTREAM_EMBED_MODEL = "sim-embed"
# `make run-model`: SmolLM2 on the llama.cpp server, the simulator behind it.
REAL_MODEL = peers.SMOLLM2_ALIAS
REAL_MODEL_ENDPOINT = "llama-smollm2"
REAL_MODEL_WINDOW = peers.SMOLLM2_CONTEXT
# A quarter of the window for the answer leaves room for a real conversation.
REAL_MODEL_MAX_OUTPUT = 512
TRUE = {"1", "true", "yes", "on"}
FALSE = {"", "0", "false", "no", "off"}


class Command(BaseCommand):
    help = (
        "Create an admin user if there is none (printing its password once) and "
        "register the demo endpoints: two local simulated upstreams, the llama.cpp "
        "server of `make run-model` with --model-port, and the real endpoint named "
        "by LLM_BASE_URL / LLM_API_KEY / LLM_MODEL when set. "
        "LLM_BASE_URL must be https:// unless it is on this machine or "
        "LLM_ALLOW_PLAIN_HTTP=true."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--primary-port", type=int, default=9101)
        parser.add_argument("--fallback-port", type=int, default=9102)
        parser.add_argument(
            "--model-port",
            type=int,
            default=None,
            help=(
                f"Port of the llama.cpp server serving SmolLM2: registers the model "
                f"{REAL_MODEL!r} with it first and the simulated fallback behind it."
            ),
        )

    def handle(
        self,
        *args: object,
        primary_port: int,
        fallback_port: int,
        model_port: int | None = None,
        **opts,
    ) -> None:
        configured = self._configured_url()
        self._admin()
        with transaction.atomic():
            self._demo_endpoints(primary_port, fallback_port)
            if model_port is not None:
                self._real_model(model_port)
            else:
                self._real_model_off()
            if configured is not None:
                self._configured_endpoint(*configured)

    def _configured_url(self) -> tuple[str, bool] | None:
        """LLM_BASE_URL and whether it may be plain HTTP; refused before any write."""
        base_url = os.environ.get("LLM_BASE_URL", "").strip().rstrip("/")
        if not base_url:
            return None
        raw = os.environ.get("LLM_ALLOW_PLAIN_HTTP", "").strip().lower()
        if raw not in TRUE | FALSE:
            raise CommandError(
                f"LLM_ALLOW_PLAIN_HTTP must be true or false, not {raw!r}."
            )
        allow_plain_http = raw in TRUE
        refused = transport_policy.refusal(base_url, allow_plain_http=allow_plain_http)
        if refused:
            params = {**refused.params, "allow": "set LLM_ALLOW_PLAIN_HTTP=true"}
            message = refused.message % params if refused.params else refused.message
            raise CommandError(f"LLM_BASE_URL: {message}")
        return base_url, allow_plain_http

    def _admin(self) -> None:
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            return
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser("admin", "admin@localhost", password)
        self.stdout.write(
            self.style.WARNING(
                "Created the admin user. Sign in as 'admin' with password "
                f"{password} (shown only this once)."
            )
        )

    def _demo_endpoints(self, primary_port: int, fallback_port: int) -> None:
        # Each endpoint has its own path prefix, so a chat message can script
        # one of them alone: "/sim prefix=/primary fault=status status=503".
        for name, port, priority in (
            ("demo-primary", primary_port, 10),
            ("demo-fallback", fallback_port, 20),
        ):
            prefix = name.removeprefix("demo-")
            endpoint, _ = Endpoint.objects.update_or_create(
                name=name,
                defaults={
                    "base_url": f"http://127.0.0.1:{port}/{prefix}/v1",
                    "priority": priority,
                    "probe_interval": 30,
                },
            )
            # The simulated upstreams read image parts ("/sim images" reports
            # them), so the demo chat offers attaching images.
            ModelRoute.objects.update_or_create(
                model_name=DEMO_MODEL,
                endpoint=endpoint,
                defaults={
                    "upstream_model": DEMO_UPSTREAM_MODEL,
                    "priority": priority,
                    "accepts_images": True,
                },
            )
            ModelRoute.objects.update_or_create(
                model_name=DEMO_EMBED_MODEL,
                endpoint=endpoint,
                defaults={
                    "kind": RouteKind.EMBEDDING,
                    "upstream_model": DEMO_UPSTREAM_EMBED_MODEL,
                    "priority": priority,
                },
            )
        self.stdout.write(
            f"Demo models {DEMO_MODEL!r} and {DEMO_EMBED_MODEL!r} (embeddings): "
            "simulated upstreams on ports "
            f"{primary_port} (primary) and {fallback_port} (fallback). To watch a "
            "fallback, send a message with the line "
            "'/sim prefix=/primary fault=status status=503'."
        )

    def _real_model(self, port: int) -> None:
        endpoint, _ = Endpoint.objects.update_or_create(
            name=REAL_MODEL_ENDPOINT,
            defaults={
                "base_url": f"http://127.0.0.1:{port}/v1",
                "priority": 5,
                "probe_interval": 30,
                "enabled": True,
            },
        )
        # Both routes get SmolLM2's real window, so a failover answers the same
        # fitted conversation; the simulated fallback serves sim-small for it.
        fallback = Endpoint.objects.get(name="demo-fallback")
        for route_endpoint, upstream_model, priority in (
            (endpoint, REAL_MODEL, 10),
            (fallback, DEMO_UPSTREAM_MODEL, 20),
        ):
            ModelRoute.objects.update_or_create(
                model_name=REAL_MODEL,
                endpoint=route_endpoint,
                defaults={
                    "upstream_model": upstream_model,
                    "priority": priority,
                    "context_window": REAL_MODEL_WINDOW,
                    "max_output_tokens": REAL_MODEL_MAX_OUTPUT,
                    "enabled": True,
                },
            )
        self.stdout.write(
            f"Model {REAL_MODEL!r}: SmolLM2 on the llama.cpp server on port {port}, "
            "the simulated fallback behind it (stop the server to watch a failover)."
        )

    def _real_model_off(self) -> None:
        """`make run` after `make run-model`: nothing left on a stopped server."""
        turned_off = ModelRoute.objects.filter(
            model_name=REAL_MODEL, enabled=True
        ).update(enabled=False)
        turned_off += Endpoint.objects.filter(
            name=REAL_MODEL_ENDPOINT, enabled=True
        ).update(enabled=False)
        if turned_off:
            self.stdout.write(
                f"Model {REAL_MODEL!r} turned off: the llama.cpp server runs only "
                "with `make run-model`."
            )

    def _configured_endpoint(self, base_url: str, allow_plain_http: bool) -> None:
        model = os.environ.get("LLM_MODEL", "gpt-4o-mini")
        endpoint, _ = Endpoint.objects.update_or_create(
            name="configured",
            defaults={
                "base_url": base_url,
                "allow_plain_http": allow_plain_http,
                "priority": 1,
            },
        )
        key = os.environ.get("LLM_API_KEY", "")
        if key and key != endpoint.api_key:
            endpoint.api_key = key
            endpoint.save(update_fields=["api_key_encrypted"])
        ModelRoute.objects.update_or_create(
            model_name=model,
            endpoint=endpoint,
            defaults={"upstream_model": model, "priority": 1},
        )
        # The simulated primary stands behind the real endpoint as its fallback.
        demo = Endpoint.objects.get(name="demo-primary")
        ModelRoute.objects.update_or_create(
            model_name=model,
            endpoint=demo,
            defaults={"upstream_model": DEMO_UPSTREAM_MODEL, "priority": 50},
        )
        self.stdout.write(f"Registered {base_url} as model {model!r} (first in line).")
        if endpoint.sends_in_clear:
            self.stdout.write(
                self.style.WARNING(
                    f"{base_url} is plain HTTP: its API key travels in clear "
                    "(LLM_ALLOW_PLAIN_HTTP=true)."
                )
            )
