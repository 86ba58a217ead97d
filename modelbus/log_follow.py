"""``modelbus logs MODEL -f``: a model server's last lines, then each new one as it comes,
until Ctrl-C (exit 0) or ``--timeout``. Each ask passes the last reply's cursor back as
``since``: again at once while the agent says more lines are there, else after
FOLLOW_INTERVAL_S. When the log restarted (the server started again) stderr says so and the
new run is followed from its first line. Replies come on the client's own topic under
``P/H/reply/private/``, which viewers cannot read."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TextIO

from modelbus.bus_commands import no_reply, refused, send
from modelbus.client_session import (
    DEFAULT_REPLY_TIMEOUT_S,
    EXIT_OK,
    Request,
    Session,
    deadline_in,
    resolve_host,
)
from modelbus.shell_output import read_data
from shared.commands import LOG_LINES_MAX
from shared.replies import LogLines
from shared.topics import CommandName

FOLLOW_INTERVAL_S = 1.0


async def follow_log(
    session: Session, request: Request, out: TextIO, err: TextIO, deadline: float | None
) -> int:
    """``deadline`` (the loop's clock, from --timeout) ends the following, with exit 0;
    run by bus_commands.run_command, which checks the fields against the contract first."""
    host = await resolve_host(session, request.host)
    loop = asyncio.get_running_loop()
    fields: dict[str, Any] = dict(request.fields)
    while True:
        reply_deadline = deadline_in(DEFAULT_REPLY_TIMEOUT_S)
        if deadline is not None and reply_deadline is not None:
            reply_deadline = min(deadline, reply_deadline)
        try:
            answer = await send(session, host, CommandName.LOGS, fields, reply_deadline)
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                return EXIT_OK
            raise no_reply(session, host, DEFAULT_REPLY_TIMEOUT_S) from None
        # The session keeps every message it read; a follow may run for days.
        session.seen.clear()
        if answer.reply.status == "error":
            return refused("logs", answer.reply, err)
        logs = read_data(LogLines.model_validate, answer.reply.data, "logs")
        if logs.restarted:
            print(
                f"modelbus logs: the log of {logs.model} restarted (its server started "
                "again); following the new run from its start",
                file=err,
                flush=True,
            )
        if request.json_output:
            print(json.dumps(answer.raw), file=out)
        else:
            for line in logs.lines:
                print(line, file=out)
        out.flush()
        # -n counts the last lines shown first; what follows comes as fast as it was written.
        fields.update(since=logs.cursor, lines=LOG_LINES_MAX)
        if logs.more:
            continue
        pause = (
            FOLLOW_INTERVAL_S
            if deadline is None
            else min(FOLLOW_INTERVAL_S, deadline - loop.time())
        )
        if pause <= 0:
            return EXIT_OK
        await asyncio.sleep(pause)
