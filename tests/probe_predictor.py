"""The real predictor, reporting which thread did what: a line in each prediction's logs.

    probe setup=<id> load=<ids> engine=<id> predict=<id> model=<ids>

`model` is every thread on which a UNet, VAE, text encoder or safety checker forward ran during
the prediction. Test-only: run it as `COG_PREDICT_TYPE_STUB=tests/probe_predictor.py:Predictor`.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import lcm.engine
import lcm.model
import predict

PROBE = re.compile(r"probe setup=(\d+) load=([\d,]+) engine=(\d+) predict=(\d+) model=([\d,]+)")


def _ids(found: set[int]) -> str:
    return ",".join(str(i) for i in sorted(found))


class Predictor(predict.Predictor):
    def setup(self) -> None:
        setup_thread, load_threads = threading.get_ident(), set()
        load = lcm.model.load_pipeline

        def recording_load(*args: Any, **kwargs: Any) -> Any:
            load_threads.add(threading.get_ident())
            return load(*args, **kwargs)

        lcm.model.load_pipeline = recording_load
        try:
            super().setup()
        finally:
            lcm.model.load_pipeline = load
        engine, pipe = self.engine, self.engine.model.pipe
        model_threads: set[int] = set()
        current = {"predict": 0}
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.safety_checker):
            module.register_forward_pre_hook(lambda *_: model_threads.add(threading.get_ident()))
        submit, summary = engine.submit, engine.summary

        def submit_noting_thread(*args: Any, **kwargs: Any) -> Any:
            model_threads.clear()
            current["predict"] = threading.get_ident()
            return submit(*args, **kwargs)

        def summary_with_probe(generation: Any) -> str:
            """The request's log line, which predict() logs in the prediction's context, and the probe's."""
            return summary(generation) + (
                f"\nprobe setup={setup_thread} load={_ids(load_threads)} engine={engine.thread.ident} "
                f"predict={current['predict']} model={_ids(model_threads)}"
            )

        engine.submit, engine.summary = submit_noting_thread, summary_with_probe
