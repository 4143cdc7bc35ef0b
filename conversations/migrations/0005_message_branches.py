"""Messages form a tree: ``Message.parent`` and ``Conversation.active_leaf`` (issue 11, "Branches").

The flat history of each existing conversation becomes one branch: its messages chained in id
order (each one's parent is the message before it), the last one its active leaf.
"""

import django.db.models.deletion
from django.db import migrations, models

BATCH = 1000


def chain_messages(apps, schema_editor):
    """Chain each conversation's messages by id and make its last message the active leaf.

    One pass over the messages in (conversation, id) order, written in batches: linear in the
    number of messages, memory bounded by the batch.
    """
    Message = apps.get_model("conversations", "Message")
    Conversation = apps.get_model("conversations", "Conversation")
    rows = Message.objects.order_by("conversation_id", "id").values_list("id", "conversation_id")
    pending: list = []
    leaves: dict[int, int] = {}
    previous_conversation, previous_id = None, None
    for message_id, conversation_id in rows.iterator(chunk_size=BATCH):
        if conversation_id == previous_conversation:
            pending.append(Message(id=message_id, parent_id=previous_id))
        previous_conversation, previous_id = conversation_id, message_id
        leaves[conversation_id] = message_id
        if len(pending) >= BATCH:
            Message.objects.bulk_update(pending, ["parent"])
            pending = []
    if pending:
        Message.objects.bulk_update(pending, ["parent"])
    leaf_updates = [Conversation(id=conversation_id, active_leaf_id=leaf) for conversation_id, leaf in leaves.items()]
    Conversation.objects.bulk_update(leaf_updates, ["active_leaf"], batch_size=BATCH)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0004_conversation_organization_required")]

    operations = [
        migrations.AddField(
            model_name="conversation",
            name="active_leaf",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="conversations.message",
            ),
        ),
        migrations.AddField(
            model_name="message",
            name="parent",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="children",
                to="conversations.message",
            ),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["conversation", "parent"], name="message_conv_parent_idx"),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["parent", "id"], name="message_parent_id_idx"),
        ),
        migrations.RunPython(chain_messages, migrations.RunPython.noop, elidable=True),
    ]
