"""Prompt sets: registered collections and users' own files, read into prompt items."""
