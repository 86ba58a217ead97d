"""The application: the ``modelbus`` command (the agent daemon, the terminal UI, the
client commands, the demo, schemas) built from the layers below it.

It is the only layer that may use everything: the daemon (``agent``), the terminal UI
(``tui``), the bus client (``bus``), the contract (``shared``) and, for the demo and
``--sim``, the development tooling (``devtools``). See docs/architecture.md.
"""
