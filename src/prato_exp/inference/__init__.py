"""Segment new images with a trained checkpoint and a user's box: :class:`Segmenter` and its result."""

from prato_exp.inference.segmenter import Intensity, Prediction, Segmenter

__all__ = ["Intensity", "Prediction", "Segmenter"]
