"""``manage.py demo``: run chatbackend with the LLM simulator as its upstream, for a first look.

Seeds the database (``llm.services.demo_setup``), starts two child processes — the simulator
(``manage.py llm_simulator``) and the ASGI server (uvicorn, or daphne with ``--server daphne``) —
prints where everything is, and stops both on Ctrl-C. ``scripts/demo`` runs this after migrating.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from llm.services import DEMO_PROVIDER_NAME, DemoSetup, demo_setup

MANAGE_PY = Path(settings.BASE_DIR) / "manage.py"
STARTUP_SECONDS = 60.0
STOP_SECONDS = 10.0
_DEFAULT_HOSTS = {"localhost", "127.0.0.1", "[::1]"}


def _raise_keyboard_interrupt(signum: int, frame: Any) -> NoReturn:
    # SIGTERM / SIGHUP take the same clean path as Ctrl-C.
    raise KeyboardInterrupt


class Command(BaseCommand):
    help = (
        "Run a demo: seed an admin user and the simulator provider, start the LLM simulator and the "
        "ASGI server, print the URLs and an example request. Ctrl-C stops everything. "
        "DEMO_ADMIN_PASSWORD sets the admin password (otherwise a random one is printed once)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="interface the server binds (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
        parser.add_argument(
            "--server", choices=["uvicorn", "daphne"], default="uvicorn", help="ASGI server (default uvicorn)"
        )
        parser.add_argument(
            "--simulator-port", type=int, default=0, help="simulator port; 0 picks a free one (default 0)"
        )
        parser.add_argument(
            "--token-delay-ms", default="40", help="simulator delay between tokens, ms (default 40: visible streaming)"
        )
        parser.add_argument("--reply-tokens", default="64", help="simulator tokens per reply (default 64)")

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = options["host"], options["port"]
        self._check_port_free(host, port)
        children: list[tuple[str, subprocess.Popen[str]]] = []
        previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            # A fresh upstream key per run: the simulator requires it, the provider row stores it
            # encrypted, and no response or log line may ever show it.
            upstream_key = "sk-sim-" + secrets.token_urlsafe(24)
            simulator, simulator_url = self._start_simulator(options, upstream_key)
            children.append(("simulator", simulator))
            setup = demo_setup(
                simulator_base_url=f"{simulator_url}/v1",
                simulator_api_key=upstream_key,
                admin_password=os.environ.get("DEMO_ADMIN_PASSWORD") or None,
            )
            connections.close_all()  # this process now only supervises; hold no database handle
            server = self._start_server(options)
            children.append((options["server"], server))
            base_url = f"http://{self._display_host(host)}:{port}"
            self._wait_until_ready(base_url, children)
            self._print_banner(options, base_url, simulator_url, setup)
            self._supervise(children)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping ...")
        finally:
            self._stop(children)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write("Stopped.")

    # --- children -----------------------------------------------------------------------------

    def _check_port_free(self, host: str, port: int) -> None:
        # Otherwise the readiness probe could be answered by whatever already listens there.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise CommandError(f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port.") from None

    def _start_simulator(self, options: dict[str, Any], upstream_key: str) -> tuple[subprocess.Popen[str], str]:
        command = [
            sys.executable,
            str(MANAGE_PY),
            "llm_simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(options["simulator_port"]),
            "--api-key",
            upstream_key,
            "--token-delay-ms",
            str(options["token_delay_ms"]),
            "--reply-tokens",
            str(options["reply_tokens"]),
        ]
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and manage.py
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._relay_output, args=(process, lines), daemon=True).start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            if "listening on " in line:
                return process, line.rsplit("listening on ", 1)[1].strip().rstrip("/")
        process.kill()
        raise CommandError("The LLM simulator did not start (see its output above).")

    def _relay_output(self, process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        # Drain the simulator's pipe for its whole life (a full pipe would block it).
        assert process.stdout is not None  # noqa: S101 - Popen(stdout=PIPE)
        for line in process.stdout:
            if "listening on " in line:
                lines.put(line)
            else:
                sys.stdout.write(f"[simulator] {line}")
                sys.stdout.flush()
        lines.put(None)

    def _start_server(self, options: dict[str, Any]) -> subprocess.Popen[str]:
        host, port = options["host"], str(options["port"])
        if options["server"] == "daphne":
            command = [sys.executable, "-m", "daphne", "-b", host, "-p", port, "chatbackend.asgi:application"]
        else:
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "chatbackend.asgi:application",
                "--host",
                host,
                "--port",
                port,
                "--lifespan",
                "on",  # chatbackend.lifespan: at shutdown, every open reply is saved before exit
                "--timeout-graceful-shutdown",
                "5",  # open streams get 5 s on Ctrl-C; each still open then is saved as cancelled
            ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DJANGO_SETTINGS_MODULE": "chatbackend.settings"}
        if "DJANGO_ALLOWED_HOSTS" not in env and host not in _DEFAULT_HOSTS:
            # Listening beyond loopback: accept the Host header other machines will send.
            env["DJANGO_ALLOWED_HOSTS"] = "*" if host in {"0.0.0.0", "::"} else ",".join([*_DEFAULT_HOSTS, host])  # noqa: S104
        return subprocess.Popen(  # noqa: S603 - our own interpreter and an installed server
            command, cwd=settings.BASE_DIR, env=env, text=True, start_new_session=True
        )

    def _wait_until_ready(self, base_url: str, children: list[tuple[str, subprocess.Popen[str]]]) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                self._check_alive(children)
                try:
                    client.get(f"{base_url}/")
                except httpx.TransportError:
                    time.sleep(0.2)
                    continue
                return
        raise CommandError(f"The server did not answer at {base_url}/ within {STARTUP_SECONDS:.0f} s.")

    def _check_alive(self, children: list[tuple[str, subprocess.Popen[str]]]) -> None:
        for name, process in children:
            code = process.poll()
            if code is not None:
                raise CommandError(f"The {name} process exited with code {code} (see its output above).")

    def _supervise(self, children: list[tuple[str, subprocess.Popen[str]]]) -> None:
        while True:
            self._check_alive(children)
            time.sleep(0.5)

    def _stop(self, children: list[tuple[str, subprocess.Popen[str]]]) -> None:
        # The server first, so its open streams end while the simulator still answers.
        for name, process in reversed(children):
            if process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.stderr.write(f"The {name} process did not stop within {STOP_SECONDS:.0f} s; killing it.")
                process.kill()
                process.wait()

    # --- output -------------------------------------------------------------------------------

    @staticmethod
    def _display_host(host: str) -> str:
        if host in {"0.0.0.0", "::", ""}:  # noqa: S104 - comparing, not binding
            return "127.0.0.1"
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    def _print_banner(self, options: dict[str, Any], base_url: str, simulator_url: str, setup: DemoSetup) -> None:
        if setup.admin_created:
            login_note = f"{setup.admin_password}   (shown once: save it)"
        elif setup.admin_password:
            login_note = "from DEMO_ADMIN_PASSWORD"
        else:
            login_note = "unchanged (set DEMO_ADMIN_PASSWORD to reset it)"
        if setup.simulator_in_use:
            upstream = f"{simulator_url}/v1  (provider '{DEMO_PROVIDER_NAME}')"
        else:
            upstream = f"{simulator_url}/v1  (not used: providers were already configured)"
        title = self.style.SUCCESS(f"chatbackend is running ({options['server']}). Press Ctrl-C to stop.")
        lines = [
            "",
            title,
            "",
            f"  Home                 {base_url}/",
            f"  Admin                {base_url}/admin/   user '{setup.admin_username}', password {login_note}",
            f"  API docs             {base_url}/api/docs/",
            f"  OpenAI-compatible    {base_url}/v1   (NextChat: BASE_URL={base_url}, or 'custom endpoint')",
            f"  WebSocket            ws{base_url[4:]}/ws/conversations/<id>/?token=<JWT or API key>",
            f"  LLM simulator        {upstream}",
            f"  Models               {', '.join(setup.models) or '(none enabled: add one in the admin)'}",
            f"  API key              {setup.api_key}   (the admin's 'demo' key, replaced at every start)",
            "",
        ]
        if options["host"] in {"0.0.0.0", "::"}:  # noqa: S104 - comparing, not binding
            lines.insert(3, f"  Listening on all interfaces, port {options['port']}.")
        if setup.models:
            model = "gpt-4o-mini" if "gpt-4o-mini" in setup.models else setup.models[0]
            body = json.dumps(
                {"model": model, "stream": True, "messages": [{"role": "user", "content": "Hello!"}]},
                separators=(", ", ": "),
            )
            lines += [
                "Try it (streams the reply as server-sent events):",
                "",
                f"  curl -N {base_url}/v1/chat/completions \\",
                f"    -H 'Authorization: Bearer {setup.api_key}' \\",
                "    -H 'Content-Type: application/json' \\",
                f"    -d {shlex.quote(body)}",
                "",
            ]
        self.stdout.write("\n".join(lines))
        self.stdout.flush()
