"""Unmodified OpenAI and AUTOMATIC1111 clients against a running zturbo.

    python smoke.py http://127.0.0.1:7860 [API_KEY]

Exits non-zero (with a traceback) if either client cannot get an image. tests/clients.rs runs it
against the demo model; the calls are the ones README.md shows.
"""

import base64
import io
import sys
import urllib.parse
import urllib.request

import openai
import webuiapi
from PIL import Image

PNG = b"\x89PNG\r\n\x1a\n"


def openai_client(base, key):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key or "not-needed")

    # b64_json, as image tools usually ask.
    r = client.images.generate(
        model="dall-e-3",
        prompt="a red fox in the snow",
        n=1,
        size="256x256",
        quality="standard",
        response_format="b64_json",
    )
    png = base64.b64decode(r.data[0].b64_json)
    assert png.startswith(PNG), "not a PNG"
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    assert r.data[0].revised_prompt.startswith("a red fox in the snow"), r.data[0].revised_prompt
    print(f"openai b64_json: {len(png)} bytes, revised_prompt={r.data[0].revised_prompt!r}")

    # url: fetched with no credentials (signed when the server has a key).
    r = client.images.generate(
        model="dall-e-2", prompt="a lighthouse", n=2, size="256x256", response_format="url"
    )
    assert len(r.data) == 2
    with urllib.request.urlopen(r.data[0].url) as res:
        assert res.read().startswith(PNG)
    print(f"openai url: {r.data[0].url}")

    ids = [m.id for m in client.models.list()]
    assert "dall-e-3" in ids, ids
    print(f"openai models: {ids}")

    try:
        client.images.generate(prompt="x", size="100x100")
        raise AssertionError("an invalid size was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "size", e.body
        print(f"openai bad size: 400 {e.body['message']!r}")


def a1111_client(base, key):
    u = urllib.parse.urlparse(base)
    if key:
        api = webuiapi.WebUIApi(host=u.hostname, port=u.port, username="zturbo", password=key)
    else:
        api = webuiapi.WebUIApi(host=u.hostname, port=u.port)

    result = api.txt2img(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        seed=42,
        steps=2,
        width=256,
        height=256,
        cfg_scale=7,
        batch_size=2,
    )
    assert len(result.images) == 2, result.images
    assert result.image.size == (256, 256), result.image.size
    assert result.info["all_seeds"] == [42, 43], result.info["all_seeds"]
    assert result.parameters["seed"] == 42
    print(f"a1111 txt2img: {len(result.images)} images, seeds {result.info['all_seeds']}")
    print(f"a1111 infotext: {result.info['infotexts'][0]!r}")

    progress = api.get_progress()
    assert 0.0 <= progress["progress"] <= 1.0 and "state" in progress, progress
    models = api.get_sd_models()
    current = api.util_get_current_model()
    assert current == models[0]["title"], (current, models)
    assert api.interrupt() == {}
    print(f"a1111 model: {current}, progress: {progress['progress']}")


def main():
    base = sys.argv[1].rstrip("/")
    key = sys.argv[2] if len(sys.argv) > 2 else None
    openai_client(base, key)
    a1111_client(base, key)
    print("clients ok")


if __name__ == "__main__":
    main()
