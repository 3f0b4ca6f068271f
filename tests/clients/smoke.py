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


MASK_BOX = (24, 40, 88, 104)


def png_bytes(img):
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def edit_inputs():
    """A 128×128 picture (gradients and a disc) and a mask, white = repaint, over MASK_BOX."""
    photo = Image.new("RGB", (128, 128))
    photo.putdata([(x * 2, y * 2, 255 - x - y if x + y < 255 else 0) for y in range(128) for x in range(128)])
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, MASK_BOX)
    return photo, mask


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

    # edits: the mask's fully transparent pixels are repainted, the rest pasted back.
    photo, mask = edit_inputs()
    alpha = Image.new("RGBA", photo.size, (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), MASK_BOX)
    r = client.images.edit(
        model="gpt-image-1",
        image=("photo.png", png_bytes(photo), "image/png"),
        mask=("mask.png", png_bytes(alpha), "image/png"),
        prompt="a red sailing boat on the lake",
        n=1,
        quality="low",
        response_format="b64_json",
    )
    edited = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB")
    assert edited.size == photo.size, edited.size
    assert edited.getpixel((2, 2)) == photo.getpixel((2, 2)), "outside the mask is kept"
    print(f"openai edit: {edited.size}, revised_prompt={r.data[0].revised_prompt!r}")

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

    # img2img with a mask (white = repaint), A1111's defaults for the rest.
    photo, mask = edit_inputs()
    result = api.img2img(
        images=[photo],
        mask_image=mask,
        prompt="a red sailing boat",
        denoising_strength=0.9,
        steps=3,
        width=64,
        height=64,
        cfg_scale=1.0,
        seed=5,
    )
    assert result.image.size == photo.size, result.image.size  # only-masked: the whole picture back
    assert result.info["denoising_strength"] == 0.9, result.info
    assert result.info["all_seeds"] == [5], result.info["all_seeds"]
    assert result.image.convert("RGB").getpixel((2, 2)) == photo.getpixel((2, 2))
    print(f"a1111 img2img: {result.image.size}, infotext {result.info['infotexts'][0]!r}")
    loras = api.get_loras()
    assert isinstance(loras, list), loras
    print(f"a1111 loras: {loras}")

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
