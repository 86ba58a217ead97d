"""The bus client: the one package that talks MQTT (paho through aiomqtt).

Everything that puts modelbus on the bus builds on it: the agent (a reconnecting
client with an outbox), the terminal UI and the command-line client (one request and
reply implementation, :mod:`bus.requests`), and the settings that say where the broker
is (:mod:`bus.settings`). It imports the contract (``shared``) and nothing above it.
"""
