"""Cohorts, the server side: one training message per cohort out, one reply per member back.

A cohort (``cohort_size`` > 1) is several simulated clients that one ClientApp call trains as
one batched computation (:mod:`fedcl.cohort_training`). :func:`form_cohorts` sends one message
per cohort, to its first member's node, and :func:`split_cohort_replies` splits each cohort
reply back into one reply per member, so screening, aggregation and strategy payloads see
exactly what per-client training gives them.

Where a round's aggregate is only the weighted mean of the replies' arrays (FedAvg, FedProx,
FOT outside a task's last round: ``ContinualStrategy.cohort_mean_key``) and no unlearning
method keeps per-client updates, the server asks cohorts to average their members
themselves: the leader screens each member by the server's own rules
(:func:`fedcl.validation.stacked_problems`), takes the weighted mean of those that pass on the
device (:func:`fedcl.cohort_training.stacked_weighted_mean`) and sends one reply standing for
them (its members and any refused ones named in it: :func:`reply_members`,
:func:`members_rejected`). The server's weighted average over such replies is the average over
the members' own replies (one float rounding more), and one model's weights travel instead of K.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedcl import protocol


def member_key(key: str, partition_id: int) -> str:
    """The name of a member's record in a cohort reply (``arrays.7``)."""
    return f"{key}.{partition_id}"


def form_cohorts(messages: Sequence[Message], node_to_pid: dict[int, int], cohort_size: int,
                 mean_key: str | None = None) -> list[tuple[Message, list[Message]]]:
    """Group a round's training messages into cohorts of ``cohort_size`` (in partition order):
    for each, the message sent to the cohort's first node, with the members' partition ids in
    its config, and the members' own messages (what each member's reply answers). With
    ``mean_key`` (the strategy's weighting metric) a cohort may reply with its members'
    weighted mean (:func:`fedcl.client_app.reduced_reply`)."""
    ordered = sorted(messages, key=lambda m: node_to_pid[m.metadata.dst_node_id])
    cohorts = []
    for start in range(0, len(ordered), cohort_size):
        group = ordered[start:start + cohort_size]
        first = group[0]
        content = RecordDict()
        for key, record in first.content.items():
            if key == protocol.CONFIG:
                record = ConfigRecord(dict(record))
                record[protocol.COHORT] = [node_to_pid[m.metadata.dst_node_id] for m in group]
                if mean_key:
                    record[protocol.COHORT_MEAN_KEY] = mean_key
            content[key] = record
        leader = Message(content, dst_node_id=first.metadata.dst_node_id,
                         message_type=first.metadata.message_type,
                         group_id=first.metadata.group_id)
        cohorts.append((leader, group))
    return cohorts


def split_cohort_replies(replies: Sequence[Message],
                         cohorts: Sequence[tuple[Message, list[Message]]],
                         node_to_pid: dict[int, int]) -> list[Message]:
    """One reply per member from the cohort replies. A cohort's error reply stays one error
    reply (all its members count as failed); a member missing from a cohort reply is failed;
    a reduced reply (the members' mean, :func:`reply_members`) stays one reply, or becomes an
    error reply when the members it names are not members of its cohort."""
    members_of = {leader.metadata.message_id: group for leader, group in cohorts}
    out: list[Message] = []
    for reply in replies:
        group = members_of.get(reply.metadata.reply_to_message_id)
        if group is None or reply.has_error():
            out.append(reply)
            continue
        if protocol.COHORT_MEMBERS in reply.content:
            problem = reduced_reply_problem(reply, [node_to_pid[m.metadata.dst_node_id]
                                                    for m in group])
            out.append(reply if problem is None
                       else Message(Error(code=0, reason=problem), reply_to=group[0]))
            continue
        for member in group:
            suffix = f".{node_to_pid[member.metadata.dst_node_id]}"
            content = RecordDict()
            for key, record in reply.content.items():
                if key.endswith(suffix):
                    content[key[:-len(suffix)]] = record
            if len(content):
                out.append(Message(content, reply_to=member))
    return out


def reply_members(reply: Message) -> list[int]:
    """The partition ids a (non-error) train reply stands for: the members averaged into a
    cohort's reduced reply, else the one client that sent it."""
    members = reply.content.get(protocol.COHORT_MEMBERS)
    if members is not None:
        return [int(q) for q in members[protocol.MEMBER_IDS]]  # type: ignore[union-attr]
    return [protocol.reply_partition_id(reply)]


def members_empty(reply: Message) -> list[int]:
    """The members of a cohort's reduced reply that had no sample left to train on (not
    averaged, not faults)."""
    members = reply.content.get(protocol.COHORT_MEMBERS)
    if members is None or protocol.MEMBERS_EMPTY not in members:
        return []
    return [int(q) for q in members[protocol.MEMBERS_EMPTY]]  # type: ignore[union-attr]


def members_rejected(reply: Message) -> list[str]:
    """Why a cohort's reduced reply left members out of its mean (screening's reasons)."""
    members = reply.content.get(protocol.COHORT_MEMBERS)
    if members is None or protocol.MEMBERS_REJECTED not in members:
        return []
    return [str(r) for r in members[protocol.MEMBERS_REJECTED]]  # type: ignore[union-attr]


def reduced_reply_problem(reply: Message, cohort_members: Sequence[int]) -> str | None:
    """Why a cohort's reduced reply cannot stand for the members it names, or None."""
    try:
        named = reply_members(reply) + members_empty(reply)
        members_rejected(reply)
    except (KeyError, TypeError, ValueError):
        return f"malformed {protocol.COHORT_MEMBERS} record in a cohort reply"
    if not named or len(set(named)) != len(named) or not set(named) <= set(cohort_members):
        return (f"a cohort reply names members {named[:10]}, not distinct members of its cohort "
                f"{list(cohort_members)[:10]}")
    return None
