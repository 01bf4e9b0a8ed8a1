"""ASGI entry point: HTTP through Django, websockets through Channels.

HTTP under /v1/ goes through Django with the short LEAN_MIDDLEWARE list, every
other page through the full MIDDLEWARE (llmsite/lean.py).
"""

from __future__ import annotations

import gc
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

# Django must be set up before anything imports models.
django.setup(set_prefix=False)

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402
from chat.upload_limit import UploadSizeLimit  # noqa: E402
from llmsite.lean import django_http_application  # noqa: E402
from llmsite.origins import SameOriginValidator  # noqa: E402
from llmsite.shutdown import GracefulApp, install_daphne_hook  # noqa: E402

django_http = django_http_application()
http_app = ASGIStaticFilesHandler(django_http) if settings.SERVE_STATIC else django_http
# Image uploads are refused while they are read once over CHAT_IMAGE_MAX_BYTES.
http_app = UploadSizeLimit(http_app)

router = ProtocolTypeRouter(
    {
        "http": http_app,
        # Browsers always send Origin on websockets; other origins (another
        # scheme, host or port) are refused so another site cannot open a
        # socket with a user's session cookie.
        "websocket": SameOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

# SIGTERM: finish the answers in flight (up to SHUTDOWN_GRACE_SECONDS), refuse
# new ones, write their usage records, then exit (llmsite/shutdown.py).
application = GracefulApp(router)
install_daphne_hook()

# Move everything loaded so far (the modules, classes and functions of Django
# and the apps: over 100,000 objects) out of the collector's sight: full
# collections at 1,000 open websockets otherwise pause the loop for 70-180 ms.
# The token encodings load later, on first use (gateway/tokens.py), and add
# nothing for the collector to walk: their ranks live in Rust.
gc.freeze()
