"""Every route the gateway serves beyond chat, each through the client its users use:
the official ``openai`` client where it has the call (responses, audio, images), curl
otherwise (rerank, Anthropic's messages, a model's own API under ``/upstream/``). Each
loads its model on demand. A multipart upload may name its model after a 25 MB file:
the gateway spools it to disk instead of holding it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.gateway import Gateway, async_client, start_gateway
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker


async def curl(*args: str) -> tuple[int, dict[str, Any]]:
    """curl's HTTP status and JSON answer."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    body, _, status = output.decode().rpartition("\n")
    return int(status), json.loads(body)


async def voice_gateway(start_host: Callable[..., AgentProcess], host: Host) -> Gateway:
    models = {
        "voice": sim_model(4096, load_s=0.1, aliases=["whisper-1", "tts-1"]),
        "painter": sim_model(4096, load_s=0.1, upstream_model="sd-turbo"),
    }
    return await start_gateway(start_host, host, models, max_body_mb=64)


async def test_responses_audio_and_images_through_the_openai_client(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await voice_gateway(start_host, host)
    mark = len(host.bus.messages)
    async with async_client(gateway, timeout=60) as api:
        response = await api.responses.create(model="voice", input="hello")
        assert response.output_text == "Simulated answer from voice."
        speech = await api.audio.speech.create(model="tts-1", voice="alloy", input="two words")
        audio = speech.content
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE" and len(audio) == 44 + 3200
        wav = ("clip.wav", b"\x01\x02" * 500, "audio/wav")
        heard = await api.audio.transcriptions.create(model="whisper-1", file=wav)
        assert heard.text.startswith("Simulated transcription by voice of clip.wav (1000 bytes")
        assert "model field 'whisper-1'" in heard.text
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # openai marks it; users call it
            translated = await api.audio.translations.create(model="voice", file=wav)
        assert translated.text.startswith("Simulated translation by voice of clip.wav")
        as_text = await api.audio.transcriptions.create(
            model="voice", file=wav, response_format="text"
        )
        assert str(as_text).startswith("Simulated transcription by voice")
        images = await api.images.generate(model="painter", prompt="a red fox", n=2)
    assert images.data is not None and len(images.data) == 2
    assert base64.b64decode(images.data[0].b64_json or "") == b"simulated image of a red fox"
    jobs = await gateway.ended_jobs("voice", "painter", after=mark, count=2)
    # One load each: every later request found its model ready.
    assert sorted(job["model"] for job in jobs.values()) == ["painter", "voice"]
    assert all(job["origin"] == "gateway" for job in jobs.values())


async def test_rerank_and_anthropic_messages_pass_through_with_curl(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await voice_gateway(start_host, host)
    json_header = ["-H", "Content-Type: application/json"]
    rerank = {"model": "voice", "query": "red fox", "documents": ["a dog", "the red fox"]}
    status, ranked = await curl(
        f"{gateway.base_url}/rerank", *json_header, "-d", json.dumps(rerank)
    )
    assert status == 200
    assert [result["index"] for result in ranked["results"]] == [1, 0]
    message = {"model": "voice", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    status, answer = await curl(
        f"{gateway.base_url}/messages",
        *json_header,
        "-H", "anthropic-version: 2023-06-01",
        "-d", json.dumps(message),
    )  # fmt: skip
    assert status == 200
    assert answer["type"] == "message"
    assert answer["content"] == [{"type": "text", "text": "Simulated answer from voice."}]
    status, unknown = await curl(
        f"{gateway.base_url}/rerank", *json_header, "-d", json.dumps({**rerank, "model": "nope"})
    )
    assert status == 404 and unknown["error"]["code"] == "model_not_found"


async def test_a_25_mb_upload_naming_its_model_last_is_spooled_not_held(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    gateway = await voice_gateway(start_host, host)
    assert gateway.agent is not None
    upload = tmp_path / "meeting.wav"
    data = bytes(range(256)) * (25 * 4096)  # 25 MiB
    upload.write_bytes(data)
    agent = psutil.Process(gateway.agent.process.pid)
    before = agent.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], agent.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # curl sends the parts in the order given: the file first, the model last.
        status, heard = await curl(
            f"{gateway.base_url}/audio/transcriptions",
            "-F", f"file=@{upload};type=audio/wav",
            "-F", "language=en",
            "-F", "model=whisper-1",
        )  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert status == 200, heard
    digest = hashlib.sha256(data).hexdigest()[:16]
    assert f"of meeting.wav ({len(data)} bytes, sha256 {digest}" in heard["text"]
    # Holding the file would have cost 25 MiB at least.
    assert peak[0] - before < 12 * 1024 * 1024, (before, peak[0])
    status, refused = await curl(
        f"{gateway.base_url}/audio/transcriptions", "-F", f"file=@{upload}"
    )
    assert status == 400 and refused["error"]["param"] == "model"


async def test_a_transcription_that_is_no_form_or_too_big_is_refused_and_the_agent_serves_on(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    models = {"voice": sim_model(4096, load_s=0.1)}
    gateway = await start_gateway(start_host, host, models, max_body_mb=1)
    url = f"{gateway.base_url}/audio/transcriptions"
    status, not_a_form = await curl(
        url, "-H", "Content-Type: application/json", "-d", '{"model": "voice"}'
    )
    assert status == 400 and "multipart/form-data" in not_a_form["error"]["message"]
    status, broken = await curl(
        url, "-H", "Content-Type: multipart/form-data; boundary=xyz", "-d", "--xyz\r\nno end"
    )
    assert status == 400 and broken["error"]["code"] == "invalid_request"
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (2 << 20))
    status, too_big = await curl(url, "-F", f"file=@{big}", "-F", "model=voice")
    assert status == 413 and too_big["error"]["code"] == "payload_too_large"
    # Nothing was loaded for the refused requests, and the gateway still answers.
    assert gateway.jobs_seen("voice") == {}
    assert gateway.agent is not None and gateway.agent.process.poll() is None
    status, heard = await curl(url, "-F", "file=@-;filename=a.wav", "-F", "model=voice")
    assert status == 200 and heard["text"].startswith("Simulated transcription by voice")


async def test_upstream_forwards_any_request_to_the_models_own_api_verbatim(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await voice_gateway(start_host, host)
    mark = len(host.bus.messages)
    base = f"http://127.0.0.1:{gateway.port}/upstream/voice"
    status, echoed = await curl(
        "-X", "PUT", f"{base}/sim/echo?speaker=2&diarize=true",
        "-H", "X-Trace: abc", "-H", "Content-Type: application/octet-stream",
        "--data-binary", "raw body bytes",
    )  # fmt: skip
    assert status == 200
    assert echoed["model"] == "voice"
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/sim/echo?speaker=2&diarize=true"
    assert echoed["headers"]["x-trace"] == "abc"
    assert echoed["headers"]["content-type"] == "application/octet-stream"
    assert echoed["body_sha256"] == hashlib.sha256(b"raw body bytes").hexdigest()
    (job,) = (await gateway.ended_jobs("voice", after=mark)).values()
    assert job["state"] == "succeeded" and job["origin"] == "gateway"
    status, fetched = await curl(f"{base}/sim/echo")
    assert status == 200 and fetched["method"] == "GET" and fetched["body_bytes"] == 0
    status, missing = await curl(f"http://127.0.0.1:{gateway.port}/upstream/nope/sim/echo")
    assert status == 404 and missing["error"]["code"] == "model_not_found"
    status, their_404 = await curl(f"{base}/no/such/route")
    assert status == 404 and "no route for GET /no/such/route" in their_404["error"]["message"]


async def test_the_new_routes_need_the_user_role(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    keys = [
        {"name": "dashboard", "role": "viewer", "key": "viewer-key-0123456789"},
        {"name": "app", "role": "user", "key": "user-key-0123456789"},
    ]
    models = {"voice": sim_model(4096, load_s=0.1)}
    gateway = await start_gateway(start_host, host, models, api_keys=keys)
    viewer = openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="viewer-key-0123456789", max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError):
        await viewer.audio.transcriptions.create(model="voice", file=("a.wav", b"\0" * 10))
    with pytest.raises(openai.PermissionDeniedError):
        await viewer.responses.create(model="voice", input="hi")
    await viewer.close()
    base = f"http://127.0.0.1:{gateway.port}/upstream/voice/sim/echo"
    status, _ = await curl(base, "-H", "X-API-Key: viewer-key-0123456789")
    assert status == 403
    status, echoed = await curl(base, "-H", "Authorization: Bearer user-key-0123456789")
    assert status == 200
    # The caller's key is the gateway's business, not the model server's.
    assert "authorization" not in echoed["headers"] and "x-api-key" not in echoed["headers"]
