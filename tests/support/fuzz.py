"""Hostile commands from a seeded generator, for tests/integration/test_fuzz.py.

Each case is a command level (every verb, and unknown ones), a payload and a response
topic. The payloads cover what a careless script, a broken workflow or an attacker sends:
malformed JSON, wrong types, huge and negative numbers, NaN and Infinity, deep nesting,
oversized payloads, invalid UTF-8, lone surrogates and odd unicode, path traversal in
names, odd request ids, response topics outside the reply tree, and random bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shared.topics import CommandName, HostTopics

VERBS = [command.value for command in CommandName]
FIELDS = ["model", "gpu", "priority", "wait", "exclusive", "force", "all", "repo", "revision",
          "include", "exclude", "name", "job_id", "request_id", "lines", "since",
          "limit"]  # fmt: skip
ODD_TEXT = [
    "", " ", "\u0000", "\u202e", "\ufeff", "\U0001f600", "Ω" * 70, "a" * 5000, "../../etc/passwd",
    "..", "/", "qwen/../../x", "C:\\Windows", "%2e%2e%2f", "name with spaces", "\t\n", "null",
    "whisperx\u0000", "whisperx ", "WHISPERX", "$(reboot)", "`id`", "'; DROP TABLE jobs; --",
    "\udcff-escaped-by-json", "\u00e9\u0301", "\u3000", "-" * 65, "+", "#", "modelbus/+/cmd/#",
    "0.0", "18f3a.99999999999999999999s", "run.1-1", "a" * 81 + ".0",
]  # fmt: skip
ODD_NUMBERS = [
    -1, 0, 1, 63, 64, 2**31, -(2**31), 2**63, 2**64 + 1, 10**300, -(10**300), 1.5, -0.0,
    1e308, -1e308, 4.9e-324,
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Case:
    number: int
    level: str
    payload: bytes
    # None: no response topic (the reply goes to P/H/reply/<command>).
    response_topic: str | None
    kind: str


class HostileCommands:
    """A seeded stream of cases: the same seed gives the same cases."""

    def __init__(self, topics: HostTopics, seed: int) -> None:
        self.topics = topics
        self.rng = random.Random(seed)
        self._makers: list[tuple[str, Callable[[], bytes]]] = [
            ("malformed json", self._malformed_json),
            ("wrong types", self._wrong_types),
            ("odd numbers", self._odd_numbers),
            ("nan and infinity", self._nan_infinity),
            ("deep nesting", self._deep_nesting),
            ("big payload", self._big_payload),
            ("invalid utf-8", self._invalid_utf8),
            ("surrogates and unicode", self._odd_unicode),
            ("path traversal", self._path_traversal),
            ("odd request id", self._odd_request_id),
            ("random bytes", self._random_bytes),
            ("bare text", self._bare_text),
            ("plausible command", self._plausible),
        ]

    def cases(self, count: int) -> Iterator[Case]:
        for number in range(count):
            kind, make = self.rng.choice(self._makers)
            level = self._level()
            yield Case(number, level, make(), self._response_topic(number, level), kind)

    # -- where it goes -------------------------------------------------------------

    def _level(self) -> str:
        roll = self.rng.random()
        if roll < 0.85:
            return self.rng.choice(VERBS)
        # Unknown verbs; a level cannot hold "/", "+", "#" or NUL (the broker would
        # refuse the topic, or route it elsewhere).
        odd = ["reboot", "LOAD", "load ", "sta tus", "\u00fcnload", "x" * 300, "\U0001f600",
               "cmd", "..", "status.json", "ẞ" * 40]  # fmt: skip
        return self.rng.choice(odd)

    def _response_topic(self, number: int, level: str) -> str | None:
        roll = self.rng.random()
        # Under the private tree for a private command (logs); elsewhere it is refused.
        mine = self.topics.client_reply(level, f"fuzz/{number}")
        if roll < 0.7:
            return mine
        if roll < 0.8:
            return None
        outside = [
            f"{self.topics.prefix}/reply/fuzz/{number}",  # protocol 1's tree
            f"{self.topics.prefix}/other-host/reply/x",
            self.topics.state,
            self.topics.command("load"),
            "homeassistant/status",
            f"{self.topics.base}/reply",
            "elsewhere/" + "x" * 600,
            f"{self.topics.base}/reply/\u202e",
            self.topics.reply(f"fuzz/{number}"),  # outside the private tree (logs)
            f"{self.topics.base}/reply/private",
        ]
        return self.rng.choice(outside)

    # -- payloads --------------------------------------------------------------------

    def _object(self, fields: dict[str, object]) -> bytes:
        return json.dumps(fields, ensure_ascii=self.rng.random() < 0.5).encode(
            "utf-8", "surrogatepass"
        )

    def _some_fields(self) -> dict[str, object]:
        return {self.rng.choice(FIELDS): self._value() for _ in range(self.rng.randint(0, 4))}

    def _value(self, depth: int = 0) -> object:
        roll = self.rng.random()
        if roll < 0.25:
            return self.rng.choice(ODD_TEXT)
        if roll < 0.45:
            return self.rng.choice(ODD_NUMBERS)
        if roll < 0.55:
            return self.rng.choice([True, False, None])
        if roll < 0.7 and depth < 3:
            return [self._value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        if roll < 0.8 and depth < 3:
            return {self.rng.choice(ODD_TEXT): self._value(depth + 1)}
        return "whisperx"

    def _malformed_json(self) -> bytes:
        good = self._object(self._some_fields() or {"model": "whisperx"})
        cut = self.rng.randint(1, max(1, len(good) - 1))
        broken = [good[:cut], good + b",", b"{" + good, good.replace(b'"', b"'"),
                  b'{"model": "whisperx",}', b"{model: whisperx}", b'{"a":1}{"b":2}',
                  b'{"model": "x" "gpu": 1}', b"{\x00}", b"{" * 3]  # fmt: skip
        return self.rng.choice(broken)

    def _wrong_types(self) -> bytes:
        field = self.rng.choice(FIELDS)
        wrong = self.rng.choice([[], {}, "0", "true", 1.0, [1, 2], {"$gt": ""}, None, -5])
        return self._object({field: wrong, **({"model": "whisperx"} if field != "model" else {})})

    def _odd_numbers(self) -> bytes:
        digits = self.rng.choice([5000, 4301, 400, 30])
        number = ("-" if self.rng.random() < 0.3 else "") + "9" * digits
        field = self.rng.choice(["gpu", "priority", "model", "request_id", "job_id", "lines"])
        return f'{{"model": "whisperx", "{field}": {number}}}'.encode()

    def _nan_infinity(self) -> bytes:
        token = self.rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999"])
        field = self.rng.choice(["gpu", "priority", "wait", "lines", "limit"])
        return f'{{"model": "whisperx", "{field}": {token}}}'.encode()

    def _deep_nesting(self) -> bytes:
        depth = self.rng.choice([100, 199, 201, 1100, 5000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        field = self.rng.choice(["model", "request_id", "include"])
        return f'{{"{field}": {opener * depth}1{closer * depth}}}'.encode()

    def _big_payload(self) -> bytes:
        size = self.rng.choice([16 * 1024, 16 * 1024 + 1, 64 * 1024, 200 * 1024])
        return self._object({"model": "whisperx", "request_id": "r", "pad": "x" * size})

    def _invalid_utf8(self) -> bytes:
        bad = self.rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        return b'{"model": "' + bad + b'"}' if self.rng.random() < 0.5 else bad + b"whisperx"

    def _odd_unicode(self) -> bytes:
        text = self.rng.choice(['"\\ud800"', '"\\udfff x"', '"\\ud83d"', '"\\u0000"', '"\\uffff"',
                                '"\u202egnp.exe"', '"\U0001f600"', '"\\ud83d\\ude00"'])  # fmt: skip
        field = self.rng.choice(["model", "request_id", "job_id", "name", text])
        if field == text:
            return f"{{{text}: 1}}".encode()
        return f'{{"{field}": {text}}}'.encode()

    def _path_traversal(self) -> bytes:
        name = self.rng.choice(
            ["../../etc/passwd", "..", "../x", "a/../../b", "/etc/shadow", "~root",
             "weights/../../..", "..\\..\\x", "./.", "%2e%2e"]
        )  # fmt: skip
        field = self.rng.choice(["model", "name", "repo", "revision", "job_id", "include"])
        value: object = [name] if field == "include" else name
        return self._object({field: value})

    def _odd_request_id(self) -> bytes:
        request_id = self.rng.choice(
            ["", "x" * 129, "x" * 128, "\u0000", "\n", 42, None, [], {"id": 1}, "\u202e", "🚀" * 40]
        )
        return self._object({"request_id": request_id, **self._some_fields()})

    def _random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 300))

    def _bare_text(self) -> bytes:
        return self.rng.choice(ODD_TEXT).encode("utf-8", "surrogatepass")

    def _plausible(self) -> bytes:
        fields = self._some_fields()
        fields.setdefault("model", self.rng.choice(["whisperx", "nope", "WHISPERX"]))
        return self._object(fields)
