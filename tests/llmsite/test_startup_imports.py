"""What a web process imports at start-up, and what waits for first use.

Each module left out here is resident memory a process that serves only /v1
(or only the chat) never pays for; each must still work when first needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Starts the ASGI application as a server does, resolves a /v1 URL and
# reverses an API one (as every page does), then lists what it imported from
# the packages that wait for first use; then counts tokens with tiktoken.
PROBE = """
import json, os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "llmsite.settings"
import llmsite.asgi
from django.urls import resolve, reverse
resolve("/v1/models")
reverse("api:usage-records")
lazy = ("rest_framework", "drf_spectacular", "PIL", "tiktoken")
imported = sorted(name for name in sys.modules if name.split(".")[0] in lazy)
from gateway import tokens
counted = tokens.count_text("hello world", "gpt-4o")
print(json.dumps({"imported": imported, "counted": counted}))
"""


def run_probe(data_dir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


def test_a_started_process_imports_neither_drf_views_nor_pillow_nor_tiktoken(
    tmp_path,
):
    probe = run_probe(tmp_path)
    # Only what INSTALLED_APPS loads: the apps' configs and system checks.
    assert probe["imported"] == [
        "drf_spectacular",
        "drf_spectacular.apps",
        "drf_spectacular.checks",
        "rest_framework",
        "rest_framework.apps",
        "rest_framework.checks",
    ]
    # tiktoken, imported by the first count that needs it, counts exactly.
    assert probe["counted"] == 2
