"""``BrushLabels``: one RLE brush region per predicted label."""
from __future__ import annotations

import cv2
import numpy as np

from backend.control_tags.base import AnnotationError, ControlTag
from backend.control_tags.rle import label_map_runs, rle_for_label
from model.predictor import SemanticPrediction


def decode_rle(rle: list[int]) -> np.ndarray:
    """label-studio-sdk's decoder, imported when an annotation is read: its module pulls in the SDK's whole
    converter (nltk, scipy.stats), which every process serving or pre-labeling would otherwise load at start."""
    from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle

    return sdk_decode_rle(rle)


class BrushLabels(ControlTag):
    tag = "BrushLabels"
    result_type = "brushlabels"

    def build(self, prediction: SemanticPrediction) -> list[dict]:
        """The RLE bytes are label-studio-sdk's ``mask2rle``'s, encoded from the label map's runs (:mod:`.rle`)."""
        height, width = prediction.label_map.shape
        runs = label_map_runs(prediction.label_map)
        return [self.result(label, {"format": "rle", "rle": rle_for_label(runs, index, height * width)}, score,
                            height, width)
                for index, label, score in self.regions(prediction)]

    @classmethod
    def check(cls, value: dict, height: int, width: int) -> None:
        if value.get("format", "rle") != "rle":
            raise AnnotationError(f"brush format {str(value.get('format'))[:20]!r} is not 'rle'")
        rle = value.get("rle")
        if not isinstance(rle, list) or not rle or not all(isinstance(b, int) and 0 <= b <= 255 for b in rle):
            raise AnnotationError("'value.rle' must be a non-empty list of bytes (0-255)")
        expected = height * width * 4
        # The header's first 32 bits say how many bytes the RLE decodes to: check before decoding.
        declared = int.from_bytes(bytes(rle[:4]), "big") if len(rle) >= 4 else -1
        if declared != expected:
            raise AnnotationError(f"'value.rle' declares {declared} bytes, not the {expected} of a "
                                  f"{width}x{height} RGBA mask")
        try:
            decoded = len(decode_rle(rle))
        except Exception as error:
            raise AnnotationError(f"'value.rle' is not a valid brush RLE ({error.__class__.__name__})") from None
        if decoded != expected:
            raise AnnotationError(f"'value.rle' decodes to {decoded} bytes, not {expected}")

    @classmethod
    def mask(cls, result: dict, height: int, width: int) -> np.ndarray | None:
        """Decoded at the size the result declares, resized if the image's differs."""
        value = result.get("value", {})
        if value.get("format", "rle") != "rle" or "rle" not in value:
            return None
        rle_height = int(result.get("original_height") or height)
        rle_width = int(result.get("original_width") or width)
        mask = np.asarray(decode_rle(value["rle"]), np.uint8).reshape(rle_height, rle_width, 4)[..., 3] > 127
        if mask.shape != (height, width):
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        return mask
