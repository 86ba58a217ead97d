"""Development tooling: simulated GPUs, the simulated model server and private brokers.

What the demo (``modelbus demo``), ``modelbus agent --sim`` and the tests run in place of
real GPUs, real model servers and a system Mosquitto. The daemon never imports it: the
application layer (``modelbus``) hands the agent a simulated GPU backend when asked to.
"""
