"""The real agent with room for only 5 waiting commands instead of 1,000, so that a
burst overflows it for sure. Run as ``python -m tests.support.small_intake_agent
agent ...``; the product has no test-only setting for this."""

from __future__ import annotations

import sys

from agent import dispatch
from modelbus import cli

dispatch.MAX_WAITING_COMMANDS = 5

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
