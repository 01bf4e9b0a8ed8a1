"""The account pages: password change and reset, own API keys, sign-up.

Thin: the key rules live in accounts.keys, the throttles in accounts.throttle.
Every page carries the site's content security policy (llmsite.pages).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from accounts import keys, throttle
from accounts.forms import (
    ApiKeyForm,
    PasswordChangeForm,
    PasswordResetForm,
    SetPasswordForm,
    SignupForm,
)
from gateway.models import ApiKey
from llmsite.pages import with_policy
from llmsite.throttle import clear_account


def _account_context(request: HttpRequest, form: ApiKeyForm | None = None) -> dict:
    own = keys.own_keys(request.user)
    return {
        "keys": own,
        "self_service": settings.SELF_SERVICE_API_KEYS,
        "form": form or ApiKeyForm(),
        "key_limit": settings.API_KEYS_PER_USER,
        "active_count": sum(1 for key in own if key.is_active),
    }


def _self_service_only() -> None:
    if not settings.SELF_SERVICE_API_KEYS:
        raise PermissionDenied("API keys are issued by an administrator.")


@login_required
@require_http_methods(["GET", "HEAD"])
def account_page(request: HttpRequest) -> HttpResponse:
    """Your account: password links and your API keys."""
    return with_policy(
        render(request, "accounts/account.html", _account_context(request))
    )


@login_required
@require_POST
@never_cache
def create_key(request: HttpRequest) -> HttpResponse:
    """Create a key and show it, once, on the page that answers the POST.

    The raw key is never stored, put in the session or a cookie; the answer
    is not cached, so going back does not show it again.
    """
    _self_service_only()
    form = ApiKeyForm(request.POST)
    if form.is_valid():
        try:
            key, raw = keys.create_key(request.user, form.cleaned_data["name"])
        except keys.KeyLimitReached as refused:
            form.add_error("name", str(refused))
        else:
            return with_policy(
                render(
                    request,
                    "accounts/key_created.html",
                    {"key": key, "raw_key": raw},
                )
            )
    return with_policy(
        render(
            request,
            "accounts/account.html",
            _account_context(request, form),
            status=400,
        )
    )


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def revoke_key(request: HttpRequest, key_id: int) -> HttpResponse:
    """Ask to confirm (GET), then revoke (POST). Another user's key is a 404."""
    _self_service_only()
    if request.method == "POST":
        try:
            key = keys.revoke_key(request.user, key_id)
        except ApiKey.DoesNotExist:
            raise Http404("No such API key.") from None
        messages.success(request, f"The key “{key.name}” ({key.prefix}…) is revoked.")
        return redirect("account")
    key = keys.own_keys(request.user).filter(pk=key_id).first()
    if key is None:
        raise Http404("No such API key.")
    return with_policy(render(request, "accounts/key_revoke.html", {"key": key}))


class _PolicyMixin:
    """The site's content security policy on Django's auth views."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return with_policy(super().dispatch(request, *args, **kwargs))


class PasswordChangeView(_PolicyMixin, auth_views.PasswordChangeView):
    """Change your password; your other sessions are signed out."""

    template_name = "accounts/password_change_form.html"
    form_class = PasswordChangeForm
    success_url = reverse_lazy("account")

    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        messages.success(self.request, "Your password is changed.")
        return response


class PasswordResetView(_PolicyMixin, auth_views.PasswordResetView):
    """Ask for a reset link by email; the answer is the same for any address."""

    template_name = "accounts/password_reset_form.html"
    form_class = PasswordResetForm
    email_template_name = "accounts/password_reset_email.txt"
    subject_template_name = "accounts/password_reset_subject.txt"
    success_url = reverse_lazy("password_reset_done")

    def form_valid(self, form: Any) -> HttpResponse:
        refusal = throttle.password_reset(self.request, form.cleaned_data["email"])
        if refusal is not None:
            form.add_error(None, refusal.message)
            return self.form_invalid(form)
        return super().form_valid(form)


class PasswordResetDoneView(_PolicyMixin, auth_views.PasswordResetDoneView):
    template_name = "accounts/password_reset_done.html"


class PasswordResetConfirmView(_PolicyMixin, auth_views.PasswordResetConfirmView):
    """Set a new password from the mailed link; a sign-in lockout ends with it."""

    template_name = "accounts/password_reset_confirm.html"
    form_class = SetPasswordForm
    success_url = reverse_lazy("password_reset_complete")

    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        clear_account(self.user.get_username())
        return response


class PasswordResetCompleteView(_PolicyMixin, auth_views.PasswordResetCompleteView):
    template_name = "accounts/password_reset_complete.html"


@require_http_methods(["GET", "HEAD", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    """Create an account (SIGNUP_ENABLED only) and sign in with it."""
    if not settings.SIGNUP_ENABLED:
        raise Http404("Sign-up is off.")
    if request.user.is_authenticated:
        return redirect(settings.LOGIN_REDIRECT_URL)
    refusal = None
    form = SignupForm()
    if request.method == "POST":
        refusal = throttle.signup(request)
        if refusal is None:
            form = SignupForm(request.POST)
            if form.is_valid():
                user = form.save()
                login(request, user)
                return redirect(settings.LOGIN_REDIRECT_URL)
        else:
            # Not validated: a refused attempt learns nothing (a taken name).
            form = SignupForm(
                initial={
                    "username": request.POST.get("username", "")[:150],
                    "email": request.POST.get("email", "")[:254],
                }
            )
    status = 429 if refusal else 400 if form.is_bound else 200
    return with_policy(
        render(
            request,
            "accounts/signup.html",
            {"form": form, "refusal": refusal},
            status=status,
        )
    )
