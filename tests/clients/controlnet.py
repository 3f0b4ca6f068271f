"""webuiapi's ControlNetUnit against zturbo (issue 20): txt2img with one unit, the model and
module lists. Usage: controlnet.py BASE_URL CONTROL_PNG MODEL_NAME."""

import json
import sys
import urllib.request
from urllib.parse import urlparse

import webuiapi
from PIL import Image

url, control_png, model = sys.argv[1:4]
u = urlparse(url)
api = webuiapi.WebUIApi(host=u.hostname, port=u.port)
cn = webuiapi.ControlNetInterface(api)
assert model in cn.model_list(), cn.model_list()
modules = json.load(urllib.request.urlopen(f"{url}/controlnet/module_list"))["module_list"]
assert modules == ["none", "canny"], modules
unit = webuiapi.ControlNetUnit(image=Image.open(control_png), module="canny", model=model, weight=0.8,
                               threshold_a=50, threshold_b=150, guidance_start=0.0, guidance_end=0.75)
r = api.txt2img(prompt="a lake", width=128, height=128, steps=2, cfg_scale=1.0, seed=5,
                controlnet_units=[unit])
assert r.image.size == (128, 128), r.image.size
detected = api.controlnet_detect([Image.open(control_png)], module="canny", threshold_a=100, threshold_b=200)
assert len(detected.images) == 1 and detected.images[0].size == (128, 128), detected.images
print("controlnet client ok")
