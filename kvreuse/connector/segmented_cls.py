"""The scheduler extension's qualified name, importable without vLLM (for `kvreuse serve`)."""

SCHEDULER_CLS = "kvreuse.connector.segmented.SegmentedScheduler"
