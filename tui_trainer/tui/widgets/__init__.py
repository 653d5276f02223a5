"""Widgets of the main screen: loss plot, run tree, device panel, status line, sample panel."""
