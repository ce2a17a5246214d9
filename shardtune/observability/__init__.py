"""Watching a run without changing it: logging, per-step metrics and trackers, FLOP counting and MFU,
memory peaks, the profiler and metric plots. Nothing in the path of a run depends on what is here."""
