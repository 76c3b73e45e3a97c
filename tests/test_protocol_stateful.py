"""The researcher/node protocol as a hypothesis state machine (fedsm.testing.JobProtocolMachine).

Over the memory bus: scripted nodes answer train requests correctly, with an error, twice, a
round late, for another job, or not at all; the real Job collects, times rounds out on a clock
the machine moves and aggregates; the researcher is killed and restored mid-round. After every
step: the log verifies and replays to the live state, a restore gives the live state, no
(round, node) is counted twice, a round aggregates only replies to its own requests, and no
open round outlives its deadline. The same machine runs again over a lossy memory bus that
drops and duplicates messages.
"""

from __future__ import annotations

from fedsm.testing import JobProtocolMachine
from fedsm.transport import Faults


class ProtocolMachine(JobProtocolMachine):
    """The machine as fedsm ships it: a perfect memory bus."""


class LossyProtocolMachine(JobProtocolMachine):
    """Every bus drops and duplicates messages; rounds then end by their deadline."""

    faults = Faults(drop=0.15, duplicate=0.25, seed=7)
    # Real seconds the researcher waits for answers a lossy bus may have lost: keep them short
    # (the round's window is on the machine's clock; the job's end waits at most this long).
    deadline_s = 0.5
    approval_deadline_s = 0.2


TestProtocol = ProtocolMachine.TestCase
TestLossyProtocol = LossyProtocolMachine.TestCase
