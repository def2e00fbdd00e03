"""Evaluation and cost: analytical FLOPs, measured latency and memory, reports and pictures of what was kept."""
