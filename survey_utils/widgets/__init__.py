"""Widgets of the chapters: an :class:`Explorer` base (controls, one live figure, a message line) and the
views built on it. Chapter 04 explains the trainable-parameter view; chapter 00 the memory view."""

from survey_utils.widgets.base import Explorer
from survey_utils.widgets.params import MethodExplorer

__all__ = ["Explorer", "MethodExplorer"]
