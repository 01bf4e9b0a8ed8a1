"""Forms of the account pages."""

from __future__ import annotations

import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django import forms
from django.contrib.auth import forms as auth_forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import UserCreationForm

from gateway.models import ApiKey

KEY_NAME_MAX_LENGTH = ApiKey._meta.get_field("name").max_length


class PlainLabels:
    """Labels without Django's trailing colon, as on the login page."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class ApiKeyForm(PlainLabels, forms.Form):
    """The name of a new API key."""

    name = forms.CharField(
        max_length=KEY_NAME_MAX_LENGTH,
        help_text=(
            f"What the key is for, to recognise it later "
            f"(up to {KEY_NAME_MAX_LENGTH} characters)."
        ),
    )

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        # Control and format characters (newlines, bidi overrides) would make
        # a name in a list read as something else.
        if any(unicodedata.category(char) in {"Cc", "Cf"} for char in name):
            raise forms.ValidationError(
                "The name cannot contain control or invisible characters.",
                code="invalid_characters",
            )
        return name


class SignupForm(PlainLabels, UserCreationForm):
    """Username, email and a password the validators accept."""

    email = forms.EmailField(
        max_length=254,
        help_text="For resetting a forgotten password.",
    )

    class Meta(UserCreationForm.Meta):
        model = get_user_model()
        fields = ("username", "email")


# Reset mail is sent by this one thread after the page has answered: waiting
# for a mail server only when an account has the address would tell, by the
# answer's time, which addresses exist. Failures are logged by Django's form.
_reset_mailer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reset-mail")


class PasswordResetForm(PlainLabels, auth_forms.PasswordResetForm):
    """Django's reset form, mailing in the background."""

    def send_mail(self, *args: Any, **kwargs: Any) -> None:
        _reset_mailer.submit(super().send_mail, *args, **kwargs)


def wait_for_reset_mail(timeout: float = 10) -> None:
    """Return once every reset mail asked for so far has been handed over."""
    _reset_mailer.submit(lambda: None).result(timeout=timeout)


class PasswordChangeForm(PlainLabels, auth_forms.PasswordChangeForm):
    """Django's password change form."""


class SetPasswordForm(PlainLabels, auth_forms.SetPasswordForm):
    """Django's form for the new password of a reset."""
