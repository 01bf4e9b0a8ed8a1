"""Store endpoints' extra headers encrypted, like their API keys."""

from __future__ import annotations

import json

from django.db import migrations, models

from gateway import crypto


def encrypt_headers(apps, schema_editor) -> None:
    Endpoint = apps.get_model("gateway", "Endpoint")
    for endpoint in Endpoint.objects.iterator():
        headers = endpoint.extra_headers
        if not headers:
            continue
        # Stored as given (a map, normally): the engine reports a bad row as
        # "cannot load its settings" for that endpoint alone, as before.
        endpoint.extra_headers_encrypted = crypto.encrypt(
            json.dumps(headers, sort_keys=True)
        )
        endpoint.save(update_fields=["extra_headers_encrypted"])


def decrypt_headers(apps, schema_editor) -> None:
    Endpoint = apps.get_model("gateway", "Endpoint")
    for endpoint in Endpoint.objects.exclude(extra_headers_encrypted="").iterator():
        endpoint.extra_headers = json.loads(
            crypto.decrypt(endpoint.extra_headers_encrypted)
        )
        endpoint.save(update_fields=["extra_headers"])


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0002_accounting"),
    ]

    operations = [
        migrations.AddField(
            model_name="endpoint",
            name="extra_headers_encrypted",
            field=models.TextField(blank=True, default="", editable=False),
        ),
        migrations.RunPython(encrypt_headers, decrypt_headers, elidable=False),
        migrations.RemoveField(
            model_name="endpoint",
            name="extra_headers",
        ),
    ]
