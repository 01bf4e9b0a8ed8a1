"""URLs of the whole site."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from llmsite.throttle import (
    ThrottledAdminAuthenticationForm,
    ThrottledAuthenticationForm,
)

# Both login pages count failures and refuse locked accounts and addresses.
admin.site.login_form = ThrottledAdminAuthenticationForm
admin.site.site_header = "llmsite administration"
admin.site.site_title = "llmsite administration"

urlpatterns = [
    path("", RedirectView.as_view(url="/chat/", permanent=False)),
    # Browsers ask for it on every page that names no icon (the admin).
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"))),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(authentication_form=ThrottledAuthenticationForm),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Your account: password change and reset, own API keys, optional sign-up.
    path("accounts/", include("accounts.urls")),
    path("chat/", include("chat.urls")),
    # The OpenAI-compatible API for programs (personal API keys).
    path("v1/", include("gateway.urls")),
    # The REST API: usage records, rollups, budgets, endpoint status.
    path("api/", include("api.urls")),
    path("admin/", admin.site.urls),
    # /healthz, /readyz and /metrics for load balancers and Prometheus.
    path("", include("monitoring.urls")),
]
