"""KServe's Python REST client (kserve.InferenceRESTClient, protocol v2) against a running service.

Run by tests/test_oip.py with the interpreter of KServe's own environment (`make oip-clients`:
kserve pins psutil<6, which the project's dependencies exclude), so it imports nothing of this
repository. Prints one JSON object of what it saw.

    python oip_kserve.py <url> <model name> <model version> <image file> [<image file> ...]
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput


def _request(name: str, tensor: InferInput, outputs: list[RequestedOutput]) -> InferRequest:
    return InferRequest(model_name=name, infer_inputs=[tensor], request_outputs=outputs)


async def main(url: str, name: str, version: str, files: list[str]) -> dict:
    seen: dict = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
        seen["live"] = await client.is_server_live(url)
        seen["ready"] = await client.is_server_ready(url)
        seen["model_ready"] = await client.is_model_ready(url, name)
        seen["unknown_model_ready"] = await client.is_model_ready(url, "no-such-model")
        # the client has no metadata calls: the protocol's GETs, as KServe's own server answers them
        async with httpx.AsyncClient(timeout=60) as plain:
            seen["server"] = (await plain.get(f"{url}/v2")).json()
            seen["model"] = (await plain.get(f"{url}/v2/models/{name}/versions/{version}")).json()
        size = seen["model"]["parameters"]["input_size"]
        encoded = [open(path, "rb").read() for path in files]

        for binary in (True, False):
            images = InferInput("images", [len(encoded)], "BYTES")
            if binary:
                images.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=True)
            else:  # JSON: BYTES elements are strings, so the images travel in base64
                import base64

                images.set_data_from_numpy(np.array([base64.b64encode(e) for e in encoded], dtype=np.object_),
                                           binary_data=False)
            outputs = [RequestedOutput("probabilities", {"binary_data": binary}),
                       RequestedOutput("top_k_labels", {"binary_data": binary, "top_k": 2}),
                       RequestedOutput("embedding", {"binary_data": binary, "normalize": False}),
                       RequestedOutput("conv2", {"binary_data": binary, "channels": [1, 4, 6]})]
            answer = await client.infer(url, _request(name, images, outputs), model_name=name)
            seen[f"bytes_binary={binary}"] = {
                out.name: {"datatype": out.datatype, "shape": out.shape,
                           "data": out.as_numpy().astype(str if out.datatype == "BYTES" else np.float64).tolist()}
                for out in answer.outputs}

        pixels = InferInput("pixels", [1, size, size, 3], "UINT8")
        pixels.set_data_from_numpy(np.zeros((1, size, size, 3), dtype=np.uint8), binary_data=True)
        answer = await client.infer(url, _request(name, pixels, [RequestedOutput("probabilities")]),
                                    model_name=name)
        seen["pixels_shape"] = answer.outputs[0].shape

        errors = {}
        wrong = InferInput("pixels", [1, 3, size, size], "UINT8")
        wrong.set_data_from_numpy(np.zeros((1, 3, size, size), dtype=np.uint8), binary_data=True)
        for case, request, model in (("shape", _request(name, wrong, []), name),
                                     ("model", _request(name, pixels, []), "no-such-model")):
            try:
                await client.infer(url, request, model_name=model)
                errors[case] = None
            except httpx.HTTPStatusError as err:
                errors[case] = {"status": err.response.status_code, "body": err.response.json()}
        seen["errors"] = errors
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))))
