"""Datasets built from data that ships in installed packages (no download)."""
