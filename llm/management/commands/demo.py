"""``manage.py demo``: run chatbackend with the LLM simulator as its upstream, for a first look.

Seeds the database (``llm.services.demo_setup``), starts two child processes — the simulator
(``manage.py llm_simulator``) and the ASGI server (uvicorn, or daphne with ``--server daphne``) —
prints where everything is, and stops both on Ctrl-C. ``scripts/demo`` runs this after migrating.

The demo keeps serving when the simulator dies: it starts it again on the same port (with the same
upstream key), so the provider row stays right; only if that port was taken meanwhile does it
take another and re-point the provider. The server dying ends the demo.

The admin's API key survives restarts, so a NextChat that saved it keeps working: the key is
``DEMO_API_KEY`` when set, else the one kept in ``.demo-api-key`` in the project directory
(written with mode 0600 and git-ignored), created on the first run. Keys are stored hashed and a
secret cannot be shown again, so that file is how the demo can print its key at every start;
delete it (or revoke the key) to get a new one. Why a file: it stays on the machine that runs the
demo, like ``db.sqlite3`` beside it, and needs nothing from the operator.
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

from chatbackend.errors import ApplicationError
from llm.services import DEMO_PROVIDER_NAME, DemoSetup, demo_setup, demo_simulator_repoint

MANAGE_PY = Path(settings.BASE_DIR) / "manage.py"
# The demo key's secret, kept for the next start (mode 0600, git-ignored).
API_KEY_FILE = Path(settings.BASE_DIR) / ".demo-api-key"
STARTUP_SECONDS = 60.0
# Seconds between attempts to start the simulator again after it died (or failed to start).
SIMULATOR_RESTART_SECONDS = 1.0
STOP_SECONDS = 10.0
_DEFAULT_HOSTS = {"localhost", "127.0.0.1", "[::1]"}


def _raise_keyboard_interrupt(signum: int, frame: Any) -> NoReturn:
    # SIGTERM / SIGHUP take the same clean path as Ctrl-C. SIGINT itself is set too: a process started
    # in the background by a non-interactive shell (``cmd &`` in a script, CI runners) inherits SIGINT
    # ignored, and Python then leaves it ignored, so Ctrl-C (or ``kill -INT``) would not stop the demo.
    raise KeyboardInterrupt


class Command(BaseCommand):
    help = (
        "Run a demo: seed an admin user and the simulator provider, start the LLM simulator and the "
        "ASGI server, print the URLs and an example request; restart the simulator if it dies. Ctrl-C "
        "stops everything. DEMO_ADMIN_PASSWORD sets the admin password (otherwise a random one is printed "
        "once); DEMO_API_KEY sets the admin's API key (otherwise one is kept in .demo-api-key)."
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
        previous = {
            sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            # A fresh upstream key per run: the simulator requires it, the provider row stores it
            # encrypted, and no response or log line may ever show it.
            upstream_key = "sk-sim-" + secrets.token_urlsafe(24)
            simulator, simulator_url = self._start_simulator(options, upstream_key)
            children.append(("simulator", simulator))
            env_key = os.environ.get("DEMO_API_KEY") or None
            try:
                setup = demo_setup(
                    simulator_base_url=f"{simulator_url}/v1",
                    simulator_api_key=upstream_key,
                    admin_password=os.environ.get("DEMO_ADMIN_PASSWORD") or None,
                    api_key=env_key or self._read_api_key_file(),
                    api_key_required=env_key is not None,
                )
            except ApplicationError as exc:
                raise CommandError(exc.message) from None
            if env_key is None:
                self._write_api_key_file(setup.api_key)
            connections.close_all()  # this process now only supervises; hold no database handle
            server = self._start_server(options)
            children.append((options["server"], server))
            base_url = f"http://{self._display_host(host)}:{port}"
            self._wait_until_ready(base_url, children)
            self._print_banner(
                options, base_url, simulator_url, setup, api_key_source="DEMO_API_KEY" if env_key else None
            )
            self._supervise(children, options, upstream_key, simulator_url)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping ...")
        finally:
            self._stop(children)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write("Stopped.")

    # --- the demo API key ---------------------------------------------------------------------

    def _read_api_key_file(self) -> str | None:
        try:
            return API_KEY_FILE.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _write_api_key_file(self, secret: str) -> None:
        """Keep ``secret`` in ``API_KEY_FILE``, readable by this user only (0600, also when it existed)."""
        if self._read_api_key_file() == secret:
            API_KEY_FILE.chmod(0o600)
            return
        descriptor = os.open(API_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(secret + "\n")
        API_KEY_FILE.chmod(0o600)

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
        try:
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    break
                if "listening on " in line:
                    return process, line.rsplit("listening on ", 1)[1].strip().rstrip("/")
        except BaseException:  # Ctrl-C while it starts: it is no child to stop yet, so end it here
            process.kill()
            process.wait()
            raise
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
                "--no-proxy-headers",  # TRUSTED_PROXY_IPS decides which X-Forwarded-For to believe
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

    def _supervise(
        self,
        children: list[tuple[str, subprocess.Popen[str]]],
        options: dict[str, Any],
        upstream_key: str,
        simulator_url: str,
    ) -> None:
        """Watch the children: start the simulator again whenever it dies; end when the server dies."""
        port = int(simulator_url.rsplit(":", 1)[1])
        while True:
            for index, (name, process) in enumerate(children):
                code = process.poll()
                if code is None:
                    continue
                if name != "simulator":
                    raise CommandError(f"The {name} process exited with code {code} (see its output above).")
                self._log(f"The LLM simulator exited with code {code}; starting it again on port {port}.")
                restarted = self._restart_simulator(options, upstream_key, port)
                if restarted is None:
                    continue  # tried again at the next round
                process, url = restarted
                children[index] = ("simulator", process)
                if url != simulator_url:
                    demo_simulator_repoint(simulator_base_url=f"{url}/v1", simulator_api_key=upstream_key)
                    connections.close_all()
                    self._log(f"The provider '{DEMO_PROVIDER_NAME}' now points at {url}/v1.")
                    simulator_url, port = url, int(url.rsplit(":", 1)[1])
                self._log(f"The LLM simulator is running again at {url}/v1.")
            time.sleep(0.5)

    def _restart_simulator(
        self, options: dict[str, Any], upstream_key: str, port: int
    ) -> tuple[subprocess.Popen[str], str] | None:
        """Start the simulator on ``port``, or on any free port if that one is taken; None if it would not start."""
        time.sleep(SIMULATOR_RESTART_SECONDS)  # a simulator that dies at once must not spin this loop
        for wanted in (port, 0):
            try:
                return self._start_simulator({**options, "simulator_port": wanted}, upstream_key)
            except CommandError as exc:
                self._log(f"{exc} Trying {'another port' if wanted else 'again'}.")
        return None

    def _log(self, text: str) -> None:
        self.stdout.write(f"[demo] {text}")
        self.stdout.flush()

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

    def _print_banner(
        self,
        options: dict[str, Any],
        base_url: str,
        simulator_url: str,
        setup: DemoSetup,
        *,
        api_key_source: str | None,
    ) -> None:
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
            f"  API key              {setup.api_key}   ({self._api_key_note(setup, api_key_source)})",
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

    @staticmethod
    def _api_key_note(setup: DemoSetup, source: str | None) -> str:
        if source:
            return f"the admin's 'demo' key, from {source}"
        state = "new, kept" if setup.api_key_created else "kept"
        return f"the admin's 'demo' key, {state} across restarts in {API_KEY_FILE.name}; delete that file for a new one"
