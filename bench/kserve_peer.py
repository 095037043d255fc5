"""The peer ``bench/inference.py`` measures against: KServe's own ``ModelServer`` serving the
same ONNX file with one onnxruntime session, REST and gRPC, the Open Inference Protocol.

Run by the kserve venv's Python (``.venv/kserve/bin/python``, made by ``scripts/setup.sh``):
it imports kserve, onnxruntime and numpy only.

    python bench/kserve_peer.py MODEL.onnx NAME HTTP_PORT GRPC_PORT THREADS
"""

from __future__ import annotations

import sys
from typing import Any

import onnxruntime
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):  # type: ignore[misc]
    """What a KServe user writes for an ONNX file: the session, run on the request's input."""

    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        self.ready = True

    def predict(
        self, payload: InferRequest, headers: Any = None, response_headers: Any = None
    ) -> InferResponse:
        batch = payload.inputs[0].as_numpy()
        (logits,) = self.session.run(["logits"], {"input": batch})
        output = InferOutput("logits", list(logits.shape), "FP32")
        # Binary data: raw_output_contents on gRPC, as tritonclient reads it; the extension on REST.
        output.set_data_from_numpy(logits, binary_data=True)
        return InferResponse(payload.id or "", self.name, [output], from_grpc=payload.from_grpc)


def main(argv: list[str]) -> None:
    path, name, http_port, grpc_port, threads = argv[1:6]
    server = ModelServer(http_port=int(http_port), grpc_port=int(grpc_port), workers=1)
    server.start([OnnxModel(name, path, int(threads))])


if __name__ == "__main__":
    main(sys.argv)
