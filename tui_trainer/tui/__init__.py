"""The Textual app (DESIGN §1, §5). Never imports torch: the engine is imported on the worker thread."""
