"""Which node messages count for a round: a pure rule from (job state, message) to an event.

Pure core, like the lifecycle: no I/O. The Job feeds every message it takes from the bus
through :func:`classify`; what comes back is either the event to record or the reason the
message is ignored. Late replies (an earlier round), duplicates, replies from nodes outside
the round, replies for another job or request, and replies from nodes that already answered
are all ignored here, so no reply is ever counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsm.core.events import NodeFailed, NodeRetrying, ReplyReceived
from fedsm.core.eventschema import EventDecodeError
from fedsm.core.jobstate import JobState
from fedsm.core.messages import ErrorReply, Message, TrainReply
from fedsm.core.protocol_errors import TRANSIENT_ERRORS, ErrorNumber
from fedsm.digests import keyed_sha256_hex

__all__ = ["Verdict", "classify", "digest_in_url", "retry_backoff_s", "train_request_id"]


def train_request_id(job_id: str, round_number: int, node_id: str, key: bytes) -> str:
    """The request id of a train request: a keyed hash of (job, round, node).

    Unguessable without ``key`` (the job's secret, kept beside its log and never in it), so
    nobody who may publish to a node's request topic can pre-claim a future id; and the same
    after a restore, so a decision taken again names the same requests.
    """
    digest = keyed_sha256_hex(key, f"{job_id}\x00{round_number}\x00{node_id}")
    return f"train-{digest[:32]}"


def retry_backoff_s(reply_deadline_s: float) -> float:
    """How long after a transient error a node is asked again: a twentieth of the round's
    window, between 0.2 s and 5 s (a full disk is freed by a person, a busy registry by a
    command that ends)."""
    return min(5.0, max(0.2, reply_deadline_s / 20.0))


def digest_in_url(url: str) -> str | None:
    """The sha256 a repository URL names (its last path segment), or None.

    Every repository addresses files by digest (``file:///root/<sha256>``,
    ``https://host/files/<sha256>``). The researcher fetches a reply's parameters from its
    own repository by digest; the URL only has to name the same file as the digest it came
    with, wherever that repository was when the node answered.
    """
    last = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    if len(last) == 64 and all(c in "0123456789abcdef" for c in last):
        return last
    return None


@dataclass(frozen=True)
class Verdict:
    """``event`` to record, or ``None`` and the ``reason`` the message was ignored."""

    event: ReplyReceived | NodeFailed | NodeRetrying | None
    reason: str = ""


def classify(state: JobState, message: Message, now: float = 0.0) -> Verdict:
    """Decide what a message taken from the bus means for the current round of ``state``
    at ``now`` (the job's clock: when a transient error's node is asked again)."""
    if not isinstance(message, (TrainReply, ErrorReply)):
        return Verdict(None, f"{message.command} is not a training reply")
    if not state.status.in_round:
        return Verdict(None, f"no round is being collected (state {state.status})")
    if message.job_id != state.job_id:
        return Verdict(None, f"reply for another job ({message.job_id})")
    if message.round != state.round:
        return Verdict(None, f"late or early reply for round {message.round}, now {state.round}")
    node = message.node_id
    if node not in state.round_nodes:
        return Verdict(None, f"{node} is not in round {state.round}")
    if state.request_ids.get(node) != message.request_id:
        return Verdict(None, f"{node} answered request {message.request_id}, not ours")
    if not state.is_pending(node):
        return Verdict(None, f"duplicate reply from {node}")

    def failed(code: int, text: str) -> Verdict:
        return Verdict(
            NodeFailed(
                round=state.round,
                node_id=node,
                request_id=message.request_id,
                code=int(code),
                message=text,
            )
        )

    if isinstance(message, ErrorReply):
        if message.code in TRANSIENT_ERRORS:
            assert state.config is not None
            return Verdict(
                NodeRetrying(
                    round=state.round,
                    node_id=node,
                    request_id=message.request_id,
                    code=int(message.code),
                    message=message.message,
                    retry_at=now + retry_backoff_s(state.config.reply_deadline_s),
                )
            )
        return failed(message.code, message.message)
    if message.training_plan_sha256 != state.plan_sha256:
        return failed(
            ErrorNumber.PLAN_DIGEST_MISMATCH,
            f"{node} reports it ran plan {message.training_plan_sha256}, not the job's plan "
            f"{state.plan_sha256}",
        )
    if not state.round_do_training and message.params_sha256 != state.params_sha256:
        return failed(
            ErrorNumber.BAD_REQUEST,
            f"{node} was asked to validate params {state.params_sha256} without training, but "
            f"answered with params {message.params_sha256}",
        )
    if digest_in_url(message.params_url) != message.params_sha256:
        return failed(
            ErrorNumber.PARAMS_DIGEST_MISMATCH,
            f"{node}'s reply names params {message.params_sha256} but its URL names another "
            f"file: {message.params_url[:200]}",
        )
    try:
        event = ReplyReceived(
            round=state.round,
            node_id=node,
            request_id=message.request_id,
            params_sha256=message.params_sha256,
            sample_size=message.sample_size,
            metrics=dict(message.metrics),
            timing=dict(message.timing),
            training_plan_sha256=message.training_plan_sha256,
            extras=dict(message.extras),
        )
    except EventDecodeError as exc:  # the protocol and the log disagree on what is valid
        return failed(ErrorNumber.BAD_REQUEST, f"{node}'s reply can not be recorded: {exc}")
    return Verdict(event)
