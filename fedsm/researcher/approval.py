"""Training-plan approval as the researcher sees it: ask the nodes, judge their answers.

Approval itself is an operator act on each node (``fedsm node plan approve``); the researcher
can only ask and fail early with the command that fixes it.
"""

from __future__ import annotations

from fedsm.core.events import ApprovalChecked
from fedsm.core.jobstate import JobState
from fedsm.core.messages import TrainingPlanStatusReply, TrainingPlanStatusRequest
from fedsm.researcher.errors import JobError, TrainingPlanNotApproved
from fedsm.researcher.requests import Requests

__all__ = ["ask_nodes", "require"]


def ask_nodes(reqs: Requests, state: JobState, deadline_s: float | None) -> ApprovalChecked:
    """Send ``training-plan-status`` to every node of the job; the event that records it.

    A node that does not answer within the deadline counts as ``no-reply`` and as requiring
    approval (the safe assumption).
    """
    config = state.config
    deadline_s = config.reply_deadline_s if deadline_s is None else deadline_s
    replies = reqs.ask(
        TrainingPlanStatusRequest,
        config.nodes,
        deadline_s,
        job_id=state.job_id,
        training_plan_url=state.plan_url,
        training_plan_sha256=state.plan_sha256,
    )
    statuses: dict[str, str] = {}
    required: dict[str, bool] = {}
    for node in config.nodes:
        reply = replies.get(node)
        if isinstance(reply, TrainingPlanStatusReply):
            statuses[node] = reply.status
            required[node] = reply.approval_required
        else:
            statuses[node] = "no-reply"
            required[node] = True
    return ApprovalChecked(
        plan_sha256=state.plan_sha256, statuses=statuses, approval_required=required
    )


def require(approvals: ApprovalChecked | None) -> None:
    """Raise :class:`TrainingPlanNotApproved` unless every node may run the plan."""
    if approvals is None:
        raise JobError("check_training_plan_is_approved_by_nodes() has not been run")
    refused = {
        n: s
        for n, s in approvals.statuses.items()
        if s != "approved" and approvals.approval_required.get(n, True)
    }
    if refused:
        raise TrainingPlanNotApproved(
            f"training plan {approvals.plan_sha256} is not approved on {refused}; on each "
            f"node run: fedsm node plan approve --dir NODE_DIR --sha256 {approvals.plan_sha256}"
        )
