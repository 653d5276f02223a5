"""The Textual app (see ARCHITECTURE.md). Never imports torch: the engine is imported on the worker thread."""
