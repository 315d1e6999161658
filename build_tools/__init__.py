"""Helpers for setup.py and the Makefile."""
