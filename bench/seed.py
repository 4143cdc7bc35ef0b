"""Create what the benchmark needs, through the project's own services (run as a child process).

    DATABASE_URL=... python -m bench.seed --simulator-url http://127.0.0.1:PORT \
        --simulator-api-key KEY --conversations 6000

Creates a user, an API key (``accounts.services.api_key_create``), a provider pointing at the
simulator and a model on it, plus ``--conversations`` empty conversations (one per concurrent
stream of the rounds that need one, so histories stay short). Prints one JSON object on stdout:
``{"api_key": "sk-...", "model": "...", "conversations": [ids...]}``. The secret is printed to
the parent through a pipe only; the benchmark never writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys

MODEL_NAME = "bench-sim"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulator-url", required=True, help="simulator root, e.g. http://127.0.0.1:8001")
    parser.add_argument("--simulator-api-key", default="", help="the key the simulator requires (empty: none)")
    parser.add_argument("--conversations", type=int, default=0, help="how many conversations to create")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
    import django

    django.setup()

    from django.db import transaction

    from accounts.services import api_key_create, user_register
    from conversations.models import Conversation
    from conversations.services import conversation_create
    from llm.models import LLMModel, Provider

    with transaction.atomic():
        user = user_register(username=f"bench-{secrets.token_hex(4)}", password=secrets.token_urlsafe(18))
        secret = api_key_create(user=user, name="bench").secret
        provider, _ = Provider.objects.update_or_create(
            name="bench-simulator",
            defaults={
                "kind": Provider.Kind.OPENAI,
                "base_url": f"{args.simulator_url.rstrip('/')}/v1",
                "api_key": args.simulator_api_key,
                # Under saturation (2000 streams on 2 cores) the first chunk can be seconds late:
                # the benchmark measures that, it must not turn it into a timeout error.
                "connect_timeout": 60.0,
                "read_timeout": 300.0,
                "enabled": True,
            },
        )
        LLMModel.objects.update_or_create(
            name=MODEL_NAME,
            defaults={"provider": provider, "upstream_model": "sim-1", "context_window": 128_000, "enabled": True},
        )
        ids: list[int] = []
        if args.conversations > 0:
            # One through the service (validates the model), the rest in bulk: same rows.
            first = conversation_create(owner=user, model_name=MODEL_NAME, title="bench")
            ids.append(first.pk)
            rest = [Conversation(owner=user, model=first.model, title="bench") for _ in range(args.conversations - 1)]
            for batch_start in range(0, len(rest), 2000):
                created = Conversation.objects.bulk_create(rest[batch_start : batch_start + 2000])
                ids.extend(c.pk for c in created)
    if len(ids) != args.conversations or any(i is None for i in ids):
        sys.exit(f"bench.seed: created {len(ids)} conversations, wanted {args.conversations}")
    json.dump({"api_key": secret, "model": MODEL_NAME, "conversations": ids}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
