"""The real predictor with an injectable fault, for Cog's real server: a prompt containing OOM_MARKER
makes every UNet pass raise torch.OutOfMemoryError, as CUDA does when a request does not fit.

Test-only: run it as `COG_PREDICT_TYPE_STUB=tests/fault_predictor.py:Predictor`.
"""

from __future__ import annotations

from typing import Any

import torch

import predict
from lcm.params import Request

OOM_MARKER = "[inject-oom]"


class Predictor(predict.Predictor):
    def setup(self) -> None:
        super().setup()
        engine = self.engine
        generate_batch, forward = engine.generate_batch, engine.model.pipe.unet.forward
        current: dict[str, bool] = {"oom": False}

        def generate_and_note(requests: list[Request], *args: Any, **kwargs: Any) -> Any:
            current["oom"] = any(OOM_MARKER in request.prompt for request in requests)
            return generate_batch(requests, *args, **kwargs)

        def forward_or_oom(*args: Any, **kwargs: Any) -> Any:
            if current["oom"]:
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/fault_predictor.py)"
                )
            return forward(*args, **kwargs)

        engine.generate_batch = generate_and_note
        engine.model.pipe.unet.forward = forward_or_oom
