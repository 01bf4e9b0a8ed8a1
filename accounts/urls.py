"""Each user's own account, under /accounts/ (next to login and logout).

Django's auth views keep their usual URL names (password_change,
password_reset, ...), which they reverse among themselves.
"""

from __future__ import annotations

from django.urls import path

from accounts import views

urlpatterns = [
    path("", views.account_page, name="account"),
    path("keys/new/", views.create_key, name="account_key_create"),
    path("keys/<int:key_id>/revoke/", views.revoke_key, name="account_key_revoke"),
    path(
        "password/change/", views.PasswordChangeView.as_view(), name="password_change"
    ),
    path("password/reset/", views.PasswordResetView.as_view(), name="password_reset"),
    path(
        "password/reset/sent/",
        views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "password/reset/<uidb64>/<token>/",
        views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "password/reset/done/",
        views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
    path("signup/", views.signup, name="signup"),
]
