"""device/sessions.py: the device's own commands under the initiator's one
unit attention retry."""

from __future__ import annotations

import asyncio
from typing import Any

from prmigrate.device.core import UA_RETRIES, Purpose, UaRetry
from prmigrate.device.sessions import submit_retrying
from prmigrate.iscsi.initiator import Session
from prmigrate.lun.types import Result
from prmigrate.scsi.constants import Status
from prmigrate.scsi.sense import Sense, encode_sense

UA = Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.RESERVATIONS_PREEMPTED))


class Scripted:
    """A session answering from a script (its last answer repeated),
    retrying with the initiator's own ``submit_retrying``."""

    submit_retrying = Session.submit_retrying

    def __init__(self, *answers: Result) -> None:
        self.answers = list(answers)
        self.sends = 0

    async def submit(self, lun: int, cdb: bytes, data_out: Any = b"", data_in_len: int = 0) -> Result:
        self.sends += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_ua_retry_is_bounded_and_keeps_what_it_met() -> None:
    session, retry = Scripted(UA), UaRetry(Purpose.GUEST)
    r = asyncio.run(submit_retrying(session, 0, bytes(6), b"", retry))  # type: ignore[arg-type]
    assert r is UA and session.sends == UA_RETRIES and len(retry.met) == UA_RETRIES
    session, retry = Scripted(UA, Result(Status.GOOD)), UaRetry(Purpose.GUEST)
    r = asyncio.run(submit_retrying(session, 0, bytes(6), b"", retry))  # type: ignore[arg-type]
    assert r.status == Status.GOOD and session.sends == 2 and len(retry.met) == 1
