"""A predictor returning two files of which only the first exists, to see when Cog reads returned files.

Test-only: run it as `COG_PREDICT_TYPE_STUB=tests/missing_output_predictor.py:Predictor`.
"""

from __future__ import annotations

import tempfile
from typing import List

from cog import BasePredictor, Path
from PIL import Image


class Predictor(BasePredictor):
    async def predict(self) -> List[Path]:
        folder = Path(tempfile.mkdtemp(prefix="missing-"))
        Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "kept.png")
        return [folder / "kept.png", folder / "gone.png"]
