"""Checkpoint key mapping and Hugging Face import/export."""
